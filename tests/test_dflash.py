"""DFlash's layout and folder format: export, the checker written from vLLM's and SGLang's loading rules
(with negative controls), import(export(d)) drafting exactly what d drafts, refusals, the mask token
choice, and `diffdraft train --kind dflash` -> `diffdraft export` -> `--drafter` end to end.

Tiny random Llama targets (conftest); their byte tokenizer has 300 tokens and no spare row, so
the drafters here use token 299 (an unused filler) as their mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import make_tokenizer
from diffdraft.backends import build_target
from diffdraft.cli import main
from diffdraft.config import SamplingConfig
from diffdraft.drafters import SHIPPED_DRAFTER, BlockDiffusionDrafter, build_drafter, required_tap_layers
from diffdraft.drafters.block_diffusion import recorded_signature, save_drafter
from diffdraft.drafters.dflash import (check_dflash_folder, choose_mask_token, dflash_tensors, export_dflash,
                                       load_dflash)
from diffdraft.errors import DiffdraftError
from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet

G = 4
TAPS = (1, 3)  # DFlash ids (0, 2) of the 4-layer tiny target
MASK = 299


def dflash_net(target, layers: int = 2, seed: int = 0) -> BlockDiffusionNet:
    hf = target.module.config
    cfg = BlockDiffusionConfig(
        hidden_size=target.hidden_size, num_taps=len(TAPS), num_layers=layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads, head_dim=target.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, block_size=G, qk_norm=True, mask_token_id=MASK)
    net = BlockDiffusionNet(cfg)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # every norm visible, so a name mapped wrongly changes the drafts
        gen = torch.Generator().manual_seed(seed + 1)
        for name, weight in net.named_parameters():
            if name.endswith("norm.weight"):
                weight.uniform_(0.5, 1.5, generator=gen)
    return net


@pytest.fixture
def target(tiny_model, tiny_tokenizer):
    return build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS, name="tiny")


@pytest.fixture
def drafter_folder(target, tmp_path) -> Path:
    folder = tmp_path / "drafter"
    save_drafter(folder, dflash_net(target), TAPS, recorded_signature(target))
    return folder


@pytest.fixture
def exported(drafter_folder, tmp_path) -> Path:
    out = tmp_path / "dflash"
    export_dflash(drafter_folder, out, dtype="float32")
    return out


def test_export_writes_dflash_names_shapes_and_config(exported, target):
    config = json.loads((exported / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"]["target_layer_ids"] == [0, 2]  # tap t = DFlash id t - 1
    assert config["dflash_config"]["mask_token_id"] == MASK and config["block_size"] == G
    assert config["num_target_layers"] == 4 and config["vocab_size"] == target.vocab_size
    tensors = load_file(str(exported / "model.safetensors"))
    assert len(tensors) == 3 + 11 * 2 and not any(n.startswith("model.") for n in tensors)
    d = target.hidden_size
    assert tensors["fc.weight"].shape == (d, 2 * d)
    assert tensors["layers.1.self_attn.k_norm.weight"].shape == (d // 4,)
    assert check_dflash_folder(exported) == []


def test_split_then_fused_weights_are_the_same_numbers(target):
    net = dflash_net(target)
    theirs = dflash_tensors(net)
    layer = net.layers[0]
    k, v = layer.kv_proj.weight.chunk(2)
    assert torch.equal(theirs["layers.0.self_attn.k_proj.weight"], k)
    assert torch.equal(theirs["layers.0.self_attn.v_proj.weight"], v)
    gate, up = layer.gate_up.weight.chunk(2)
    assert torch.equal(theirs["layers.0.mlp.gate_proj.weight"], gate)
    assert torch.equal(theirs["layers.0.mlp.up_proj.weight"], up)


def drafts(drafter, target, tokens, sampling, seed):
    out = target.prefill(target.new_state(), torch.tensor([tokens[:-1]]), want_taps=True)
    state = drafter.new_state()
    drafter.begin(state, tokens[:-1], out.taps)
    return drafter.propose(state, tokens, G - 1, sampling, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_import_of_export_drafts_exactly_the_same(target, drafter_folder, exported, temperature):
    original = build_drafter(str(drafter_folder), target)
    imported = build_drafter(str(exported), target)
    assert isinstance(imported, BlockDiffusionDrafter) and imported.tap_layers == TAPS
    sampling = SamplingConfig(temperature=temperature)
    for start in (5, 17, 30):
        tokens = list(range(40, 40 + start))
        a = drafts(original, target, tokens, sampling, start)
        b = drafts(imported, target, tokens, sampling, start)
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.probs, b.probs)


def test_the_round_trip_check_can_fail(target, drafter_folder, exported):
    """Negative control: swapping k_norm and q_norm in the exported file changes the drafts."""
    path = exported / "model.safetensors"
    tensors = load_file(str(path))
    tensors["layers.0.self_attn.q_norm.weight"], tensors["layers.0.self_attn.k_norm.weight"] = (
        tensors["layers.0.self_attn.k_norm.weight"], tensors["layers.0.self_attn.q_norm.weight"])
    save_file(tensors, str(path))
    tokens = list(range(40, 60))
    a = drafts(build_drafter(str(drafter_folder), target), target, tokens, SamplingConfig(temperature=1.0), 0)
    b = drafts(build_drafter(str(exported), target), target, tokens, SamplingConfig(temperature=1.0), 0)
    assert not torch.equal(a.probs, b.probs)


def test_required_taps_of_a_dflash_folder(exported):
    assert required_tap_layers([str(exported)]) == TAPS


def edit_config(folder: Path, change) -> None:
    path = folder / "config.json"
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def edit_tensors(folder: Path, change) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    change(tensors)
    save_file(tensors, str(path))


def prefix_model(tensors):
    for name in list(tensors):
        tensors["model." + name] = tensors.pop(name)


DAMAGE = [
    ("a model. prefix", lambda f: edit_tensors(f, prefix_model), "must not start with 'model.'"),
    ("an LM head saved", lambda f: edit_tensors(f, lambda t: t.update({"lm_head.weight": torch.zeros(300, 64)})),
     "no embedding or LM head"),
    ("fc of the wrong width", lambda f: edit_tensors(f, lambda t: t.update({"fc.weight": torch.zeros(64, 192)})),
     "fc.weight is [64, 192], expected [64, 128]"),
    ("q/k/v not split", lambda f: edit_tensors(f, lambda t: t.update(
        {"layers.0.self_attn.qkv_proj.weight": torch.zeros(128, 64)})), "unexpected tensors"),
    ("a missing tensor", lambda f: edit_tensors(f, lambda t: t.pop("layers.1.mlp.up_proj.weight")), "missing tensors"),
    ("ids without the offset", lambda f: edit_config(f, lambda c: c["dflash_config"].update(target_layer_ids=[1, 3])),
     "must lie in 0..2"),
    ("ids out of order", lambda f: edit_config(f, lambda c: c["dflash_config"].update(target_layer_ids=[2, 0])),
     "ascend strictly"),
    ("no mask token", lambda f: edit_config(f, lambda c: c["dflash_config"].pop("mask_token_id")), "mask_token_id"),
    ("a mask token beyond the vocabulary", lambda f: edit_config(f, lambda c: c["dflash_config"].update(
        mask_token_id=300)), "below vocab_size 300"),
    ("another architecture", lambda f: edit_config(f, lambda c: c.update(architectures=["LlamaForCausalLM"])),
     "architectures"),
    ("gelu", lambda f: edit_config(f, lambda c: c.update(hidden_act="gelu")), "silu"),
    ("sliding layers", lambda f: edit_config(f, lambda c: c.update(layer_types=["sliding_attention"] * 2)),
     "layer_types"),
    ("no num_target_layers", lambda f: edit_config(f, lambda c: c.pop("num_target_layers")), "num_target_layers"),
    ("config not JSON", lambda f: (f / "config.json").write_text("{nope"), "not valid JSON"),
    ("weights damaged", lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 10), "damaged"),
]


@pytest.mark.parametrize("case", DAMAGE, ids=[c[0] for c in DAMAGE])
def test_the_checker_finds_what_engines_refuse(exported, case):
    _, damage, needle = case
    damage(exported)
    problems = check_dflash_folder(exported)
    assert problems and any(needle in p for p in problems), problems


@pytest.mark.parametrize("case", DAMAGE[:6], ids=[c[0] for c in DAMAGE[:6]])
def test_a_malformed_dflash_folder_is_refused_with_one_line(exported, tiny_model_dir, capsys, case):
    case[1](exported)
    code = main(["generate", "hi", "--model", tiny_model_dir, "--drafter", str(exported), "--max-new-tokens", "4",
                 "--threads", "1"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.splitlines()) == 1 and "is not a usable DFlash drafter" in err, err


def test_a_dflash_drafter_for_another_target_is_refused(exported, tiny_model, tiny_tokenizer):
    from conftest import make_llama

    wide = build_target(make_llama(hidden=96, heads=4, kv_heads=2), tiny_tokenizer, tap_layers=TAPS, name="wide")
    with pytest.raises(DiffdraftError, match="trained for tiny"):
        build_drafter(str(exported), wide)


def test_the_original_layout_has_no_dflash_equivalent(tmp_path):
    with pytest.raises(DiffdraftError, match="no q/k norms.*learned vector.*8192 tokens"):
        export_dflash(SHIPPED_DRAFTER, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_mask_token_choice(tiny_tokenizer):
    assert choose_mask_token(tiny_tokenizer, 301) == 300  # an unused embedding row
    with pytest.raises(DiffdraftError, match="--mask-token-id"):
        choose_mask_token(tiny_tokenizer, 300)  # no spare row, no spare special token
    chat = make_tokenizer()
    chat.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<tool>", "<spare>"]})
    chat.chat_template = "{% for m in messages %}<|im_start|>{{ m.content }}<tool>{% endfor %}"
    assert chat.convert_tokens_to_ids("<spare>") == choose_mask_token(chat, len(chat))  # not in the template


def test_train_export_and_draft_end_to_end(tiny_model_dir, tmp_path, capsys):
    """`diffdraft train` (default kind dflash) -> `diffdraft export` -> the folder drafts in `generate`."""
    from diffdraft.loading import load_model
    from diffdraft.train.data import Sequence, write_shard

    model, tokenizer = load_model(tiny_model_dir)
    gen = torch.Generator().manual_seed(3)
    seqs = [Sequence(torch.randint(0, 250, (20 + n,), generator=gen).tolist(), 5) for n in range(6)]
    write_shard(tmp_path / "train-00000.safetensors", seqs[:4])
    write_shard(tmp_path / "eval-00000.safetensors", seqs[4:])
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--model", tiny_model_dir,
                 "--layers", "1", "--block-size", str(G), "--tap-layers", "1,3", "--blocks", "2", "--batch-size", "2",
                 "--steps", "3", "--eval-every", "3", "--save-every", "3", "--amp", "float32",
                 "--mask-token-id", str(MASK)]) == 0
    assert main(["export", str(tmp_path / "run" / "drafter"), "--format", "dflash", "--out",
                 str(tmp_path / "exported")]) == 0
    assert "target_layer_ids [0, 2], mask_token_id 299" in capsys.readouterr().out
    assert check_dflash_folder(tmp_path / "exported") == []
    net, taps, signature, q_scale = load_dflash(tmp_path / "exported")
    assert q_scale == 1.0
    assert taps == TAPS and net.cfg.dflash_layout and signature["name"] == tiny_model_dir
    assert main(["generate", "hello", "--model", tiny_model_dir, "--drafter", str(tmp_path / "exported"),
                 "--max-new-tokens", "8", "--threads", "1"]) == 0
    assert "exported: block-diffusion, g=15; lean, float32 weights]" in capsys.readouterr().err
