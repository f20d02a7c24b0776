"""The conversion trainer, its checkpoints and the `diffdraft dllm-train` command, on tiny models.

Data are shards in the `diffdraft data` format, written here from seeded random token
sequences (prompt + a response that ends with the end token, or is cut off).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import EOS_ID, make_llama, make_tokenizer
from diffdraft.cli import main
from diffdraft.dllm.checkpoint import load_dllm, save_dllm
from diffdraft.dllm.masks import causal_mask
from diffdraft.dllm.model import MASK_ID
from diffdraft.dllm.train import DLLMTrainConfig, DLLMTrainer, make_block_batch, response_blocks, train_dllm
from diffdraft.drafters.block_diffusion import target_signature
from diffdraft.errors import DiffdraftError
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from diffdraft.train.data import Sequence, write_shard
from diffdraft.train.masks import IGNORE
from test_dllm_model import converted


def random_sequences(count: int, seed: int) -> list[Sequence]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        prompt = torch.randint(0, 256, (int(torch.randint(3, 8, (1,), generator=gen)),), generator=gen).tolist()
        # a learnable response: a short repeated pattern, so a few steps can lower the loss
        pattern = torch.randint(0, 256, (3,), generator=gen).tolist()
        response = (pattern * 6)[: int(torch.randint(6, 17, (1,), generator=gen))]
        if i % 3:
            response.append(EOS_ID)
        out.append(Sequence(tokens=prompt + response, prompt_len=len(prompt)))
    return out


@pytest.fixture
def data_dir(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_shard(folder / "train-00000.safetensors", random_sequences(24, 0))
    write_shard(folder / "eval-00000.safetensors", random_sequences(6, 1))
    return folder


@pytest.fixture
def target(tiny_model, tiny_tokenizer):
    return build_target(tiny_model, tiny_tokenizer, name="tiny")


def config(data_dir, out, **changes) -> DLLMTrainConfig:
    base = dict(data=str(data_dir), out=str(out), block_size=4, rank=4, batch_size=4, max_len=64, steps=2, lr=1e-2,
                warmup_steps=1, eval_every=1, eval_sequences=6, save_every=1, amp="float32", save_dtype="float32")
    return DLLMTrainConfig(**{**base, **changes})


def test_response_blocks_pad_ended_and_trim_cut_responses():
    ended = Sequence(tokens=[1, 2, 10, 11, 12, 13, 14, EOS_ID], prompt_len=2)
    assert response_blocks(ended, 64, 4, EOS_ID) == ([1, 2], [10, 11, 12, 13, 14, EOS_ID, EOS_ID, EOS_ID])
    cut = Sequence(tokens=[1, 2, 10, 11, 12, 13, 14], prompt_len=2)
    assert response_blocks(cut, 64, 4, EOS_ID) == ([1, 2], [10, 11, 12, 13])
    assert response_blocks(ended, 6, 4, EOS_ID) == ([1, 2], [10, 11, 12, 13])  # cut by max_len: not ended


def test_block_batch_layout():
    seqs = [Sequence(tokens=[1, 2, 3, 10, 11, 12, 13, EOS_ID], prompt_len=3), Sequence(tokens=[4, 20, 21], prompt_len=1)]
    batch = make_block_batch(seqs, 64, 2, EOS_ID, torch.Generator().manual_seed(0))
    ids, pos, labels = batch["ids"], batch["positions"], batch["labels"]
    clean = 3 + 6  # widest clean part: prompt 3 + response 5 padded to 6
    assert ids.shape == (2, clean + 6) and batch["mask"].shape == (2, 1, clean + 6, clean + 6)
    assert ids[0, :clean].tolist() == [1, 2, 3, 10, 11, 12, 13, EOS_ID, EOS_ID]
    assert pos[0, clean:].tolist() == [3, 4, 5, 6, 7, 8] and pos[1, clean : clean + 2].tolist() == [1, 2]
    noisy, truth = ids[0, clean:], torch.tensor([10, 11, 12, 13, EOS_ID, EOS_ID])
    hidden = noisy == MASK_ID
    assert hidden.view(3, 2).any(dim=1).all()  # at least one masked slot per block
    assert torch.equal(labels[0, clean:][hidden], truth[hidden]) and (labels[0, clean:][~hidden] == IGNORE).all()
    assert torch.equal(noisy[~hidden], truth[~hidden])
    assert (labels[:, :clean] == IGNORE).all() and (labels[1, clean + 2 :] == IGNORE).all()
    # each slot is predicted from the position before it: slot 0 of a block from the clean token
    # before the block (prompt end, then the last token of the previous clean block), slot 1 from slot 0
    assert batch["sources"][0, clean:].tolist() == [2, clean, 4, clean + 2, 6, clean + 4]
    assert batch["sources"][1, clean : clean + 2].tolist() == [0, clean]


def test_a_sequence_without_prompt_is_refused():
    with pytest.raises(DiffdraftError, match="needs a prompt"):
        make_block_batch([Sequence(tokens=[10, 11, 12, 13], prompt_len=0)], 64, 2, EOS_ID, None)


def test_one_training_step_lowers_the_loss(data_dir, tmp_path, target):
    cfg = config(data_dir, tmp_path / "run")
    from diffdraft.train.data import read_split

    trainer = DLLMTrainer(cfg, target, read_split(data_dir, "train"), read_split(data_dir, "eval"))
    batch = make_block_batch([trainer.train_data[i] for i in trainer.batch_indices(0)], cfg.max_len, cfg.block_size,
                             trainer.eos_id, torch.Generator().manual_seed(cfg.seed * 1_000_003))
    with torch.no_grad():
        before, _ = trainer.loss(batch)
    trainer.train_step()
    with torch.no_grad():
        after, _ = trainer.loss(batch)
    assert float(after) < float(before) - 1e-3, (float(before), float(after))
    assert all(not p.requires_grad for p in target.module.parameters())  # the base stayed frozen


def test_bf16_autocast_step_runs(data_dir, tmp_path, target):
    from diffdraft.train.data import read_split

    trainer = DLLMTrainer(config(data_dir, tmp_path / "run", amp="bfloat16"), target, read_split(data_dir, "train"), [])
    assert torch.isfinite(torch.tensor(trainer.train_step()))


def test_resumed_run_equals_uninterrupted(data_dir, tmp_path, target):
    straight = train_dllm(config(data_dir, tmp_path / "a", steps=3), target, log=lambda _: None)
    train_dllm(config(data_dir, tmp_path / "b", steps=1), target, log=lambda _: None)
    resumed = train_dllm(config(data_dir, tmp_path / "b", steps=3), target, log=lambda _: None)
    assert straight["loss"] == resumed["loss"]
    a = load_file(str(tmp_path / "a" / "adapter" / "drafter.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "drafter.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DiffdraftError, match="block_size"):  # resuming with another shape is refused
        train_dllm(config(data_dir, tmp_path / "b", steps=4, block_size=8), target, log=lambda _: None)


def test_a_finished_run_resumed_exports_with_its_evaluation(data_dir, tmp_path, target):
    first = train_dllm(config(data_dir, tmp_path / "a", steps=1), target, log=lambda _: None)
    again = train_dllm(config(data_dir, tmp_path / "a", steps=1), target, log=lambda _: None)  # no step left
    assert again["step"] == 1 and again["eval_loss"] == first["eval_loss"]
    saved = json.loads((tmp_path / "a" / "adapter" / "drafter.json").read_text())
    assert saved["training"]["final"]["eval_loss"] == first["eval_loss"]


def test_start_from_an_old_format_conversion_is_refused(data_dir, tmp_path, target, tiny_model):
    folder = tmp_path / "old"
    save_dllm(folder, converted(tiny_model, 4, rank=4), target_signature(target))
    config_path = folder / "drafter.json"
    saved = json.loads(config_path.read_text())
    del saved["format"]  # written before the token shift
    config_path.write_text(json.dumps(saved))
    from diffdraft.train.data import read_split

    with pytest.raises(DiffdraftError, match="format 1"):
        DLLMTrainer(config(data_dir, tmp_path / "d", num_layers=2, init_from=str(folder)), target,
                    read_split(data_dir, "train"), [])


def test_drafter_starts_from_the_converted_target(data_dir, tmp_path, target, tiny_model):
    folder = tmp_path / "target-adapter"
    net = converted(tiny_model, 4, rank=4)
    save_dllm(folder, net, target_signature(target))
    from diffdraft.train.data import read_split

    cfg = config(data_dir, tmp_path / "d", num_layers=2, init_from=str(folder))
    drafter = DLLMTrainer(cfg, target, read_split(data_dir, "train"), []).net
    own = drafter.state_dict()
    assert len(own) == 1 + 2 * 2 * 7
    assert all(torch.equal(v, net.state_dict()[k]) for k, v in own.items())


# ------------------------------------------------------------------------------ checkpoints
def forward_of(net):
    ids = torch.tensor([[3, 4, 5, MASK_ID, MASK_ID]])
    hidden, _ = net(ids, torch.arange(5)[None], causal_mask(0, 5))
    return net.logits(hidden)


def test_checkpoint_round_trip(tmp_path, target, tiny_model):
    net = converted(tiny_model, 8, rank=4)
    save_dllm(tmp_path / "c", net, target_signature(target), extra={"note": "test"})
    loaded = load_dllm(tmp_path / "c", target)
    assert loaded.config == net.config
    assert torch.equal(forward_of(loaded), forward_of(net))
    assert json.loads((tmp_path / "c" / "drafter.json").read_text())["training"] == {"note": "test"}


def test_corrupt_or_mismatched_checkpoint_refused(tmp_path, target, tiny_model):
    good = tmp_path / "good"
    save_dllm(good, converted(tiny_model, 4, rank=4), target_signature(target))

    def variant(name, edit):
        folder = tmp_path / name
        folder.mkdir()
        for f in good.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        edit(folder)
        return folder

    weights, cfg = "drafter.safetensors", "drafter.json"

    def set_config(key, value, section="dllm"):
        def edit(folder):
            data = json.loads((folder / cfg).read_text())
            data[section][key] = value
            (folder / cfg).write_text(json.dumps(data))
        return edit

    cases = {
        "truncated weights": variant("t", lambda f: (f / weights).write_bytes((f / weights).read_bytes()[:100])),
        "broken json": variant("j", lambda f: (f / cfg).write_text("{not json")),
        "missing weights": variant("m", lambda f: (f / weights).unlink()),
        "another kind": variant("k", lambda f: (f / cfg).write_text(json.dumps({"kind": "block-diffusion"}))),
        "rank differs": variant("r", set_config("rank", 8)),
        "other tokenizer": variant("o", set_config("tokenizer", "0123456789abcdef", section="base")),
    }
    for name, folder in cases.items():
        with pytest.raises(DiffdraftError) as err:
            load_dllm(folder, target)
        assert "\n" not in str(err.value), name
    other = build_target(make_llama(hidden=32, heads=2, kv_heads=1), make_tokenizer(), name="other")
    with pytest.raises(DiffdraftError, match="width"):
        load_dllm(good, other)


# ------------------------------------------------------------------------------------- CLI
def test_cli_dllm_train(data_dir, tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "cli"
    args = ["dllm-train", "--data", str(data_dir), "--out", str(out), "--model", tiny_model_dir, "--steps", "2",
            "--batch-size", "4", "--max-len", "64", "--eval-every", "1", "--save-every", "1", "--rank", "2"]
    assert main(args) == 0
    assert (out / "adapter" / "drafter.json").is_file() and (out / "checkpoint" / "trainer.json").is_file()
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    assert main(args[:-2] + ["--block-size", "0"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
