"""The block-diffusion drafter: masks, losses, train/decode consistency, checkpoints, losslessness.

Tiny random Llama targets from conftest.py; a tiny drafter net (1-2 layers of the target's
width). The key consistency check: the training forward (many blocks per sequence under
the block mask) and the decode-time drafter (context cache filled through begin/observe,
one block) compute the same logits for the same block.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import FIXED, EOS_ID, make_llama, make_tokenizer
from diffdraft.config import DraftConfig, SamplingConfig, TrainConfig
from diffdraft.drafters import BlockDiffusionDrafter, build_drafter
from diffdraft.drafters import required_tap_layers
from diffdraft.drafters.block_diffusion import save_drafter, target_signature
from diffdraft.engine import SpeculativeEngine
from diffdraft.errors import DiffdraftError
from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from diffdraft.train.losses import (
    acceptance_counts,
    per_position_acceptance,
    positional_weights,
    simulated_tau,
    weighted_block_loss,
)
from diffdraft.train.masks import IGNORE, block_attention_mask, block_labels, block_positions, sample_anchors
from lawcheck import fit

G = 4  # block size in these tests: known token + 3 masked slots
TAPS = (1, 2, 3)  # the layers the targets here tap: drafters read (1, 3) or (1, 2) of them


def tiny_net(target: TargetBackend, num_taps: int, layers: int = 1, seed: int = 0) -> BlockDiffusionNet:
    hf = target.module.config
    cfg = BlockDiffusionConfig(
        hidden_size=target.hidden_size, num_taps=num_taps, num_layers=layers, num_heads=hf.num_attention_heads,
        num_kv_heads=hf.num_key_value_heads, head_dim=target.hidden_size // hf.num_attention_heads,
        intermediate_size=hf.intermediate_size, block_size=G,
    )
    net = BlockDiffusionNet(cfg)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a visible mask embedding, so a broken mask path changes the output
        net.mask_embedding.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return net


# ------------------------------------------------------------------ block mask
def test_block_mask_enumerated():
    """Slot k of block j sees context positions < anchor_j and the slots of block j, nothing else."""
    anchors = torch.tensor([[2, 5]])
    context = 7
    mask = block_attention_mask(anchors, context, G)[0, 0]  # [2G, C + 2G]
    assert mask.shape == (2 * G, context + 2 * G)
    for j, anchor in enumerate([2, 5]):
        for k in range(G):
            row = mask[j * G + k]
            expected = [c < anchor for c in range(context)]
            expected += [(i // G) == j for i in range(2 * G)]
            assert row.tolist() == expected, (j, k)


def test_block_positions_and_labels():
    tokens = torch.tensor([[10, 11, 12, 13, 14, 15, 0, 0]])
    lengths = torch.tensor([6])
    anchors = torch.tensor([[1, 4]])
    valid = torch.tensor([[True, True]])
    assert block_positions(anchors, G).tolist() == [[1, 2, 3, 4, 4, 5, 6, 7]]
    labels = block_labels(tokens, lengths, anchors, valid, G)
    assert labels.tolist() == [[[12, 13, 14], [15, IGNORE, IGNORE]]]
    labels = block_labels(tokens, lengths, anchors, torch.tensor([[True, False]]), G)
    assert labels[0, 1].tolist() == [IGNORE] * 3


def test_anchors_stay_in_the_response():
    lengths, starts = torch.tensor([20, 9, 5]), torch.tensor([6, 3, 4])
    anchors, valid = sample_anchors(lengths, starts, 4, torch.Generator().manual_seed(0))
    for b in range(3):
        chosen = anchors[b][valid[b]]
        assert ((chosen >= starts[b]) & (chosen <= lengths[b] - 2)).all()
    assert valid[0].all() and len(set(anchors[0].tolist())) == 4  # distinct when there is room
    assert valid[2].sum() == 0  # no room after the prompt for a block with a label


# ------------------------------------------------------------------ losses and metrics
def test_positional_weights_by_hand():
    w = positional_weights(3, gamma=2.0)
    assert torch.allclose(w, torch.tensor([1.0, math.exp(-0.5), math.exp(-1.0)]))
    assert torch.equal(positional_weights(3, None), torch.ones(3))


def test_weighted_loss_by_hand():
    """Two slots with known probabilities of the true token: 0.5 and 0.25, weights 1 and 0.5."""
    logits = torch.log(torch.tensor([[[[0.5, 0.5], [0.75, 0.25]]]]))  # [1, 1, 2, V=2]
    labels = torch.tensor([[[0, 1]]])
    loss = weighted_block_loss(logits, labels, torch.tensor([1.0, 0.5]))
    expected = (1.0 * -math.log(0.5) + 0.5 * -math.log(0.25)) / 1.5
    assert abs(float(loss) - expected) < 1e-6
    labels = torch.tensor([[[0, IGNORE]]])  # an ignored slot counts for nothing
    assert abs(float(weighted_block_loss(logits, labels, torch.tensor([1.0, 0.5]))) - math.log(2)) < 1e-6


def test_acceptance_metrics_by_hand():
    # 3 blocks, 3 slots; argmax of one-hot logits = the predicted ids below
    predicted = torch.tensor([[[1, 2, 3], [1, 9, 3], [9, 2, 3]]])
    labels = torch.tensor([[[1, 2, 3], [1, 2, 3], [1, 2, IGNORE]]])
    logits = torch.nn.functional.one_hot(predicted, 10).float()
    prefix, scorable = acceptance_counts(logits, labels)
    assert prefix.tolist() == [3, 1, 0] and scorable.tolist() == [3, 3, 2]
    assert simulated_tau(prefix) == pytest.approx(1 + 4 / 3)
    rates = per_position_acceptance(prefix, scorable, 3)
    assert rates == pytest.approx([2 / 3, 1 / 2, 1.0])


# ------------------------------------------------------------------ train / decode consistency
def trainer_for(target: TargetBackend, tmp_path, steps: int = 4, kind: str = "block-diffusion", **overrides):
    """A trainer of the original layout by default; kind="dflash" for DFlash's (mask token 299)."""
    from diffdraft.train.trainer import DrafterTrainer

    if kind == "dflash":
        overrides.setdefault("mask_token_id", 299)
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), num_layers=1, block_size=G,
                      tap_layers=(1, 2), blocks_per_sequence=3, batch_size=2, steps=steps, lr=3e-3,
                      warmup_steps=1, amp="float32", kind=kind, **overrides)
    return DrafterTrainer(cfg, target, toy_sequences(target), toy_sequences(target)[:2])


def toy_sequences(target: TargetBackend):
    from diffdraft.train.data import Sequence

    gen = torch.Generator().manual_seed(3)
    seqs = []
    for n in range(6):
        prompt = torch.randint(0, 250, (5,), generator=gen).tolist()
        response = torch.randint(0, 250, (12 + n,), generator=gen).tolist()
        seqs.append(Sequence(prompt + response, len(prompt)))
    return seqs


@pytest.mark.parametrize("kind", ["block-diffusion", "dflash"])
def test_training_forward_equals_decode_time_drafter(tiny_model, tiny_tokenizer, tmp_path, kind):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    trainer = trainer_for(target, tmp_path, kind=kind)
    with torch.no_grad():  # visible MASK input and q/k norms, so a path that skips them changes the output
        if trainer.net.mask_embedding is not None:
            trainer.net.mask_embedding.normal_(generator=torch.Generator().manual_seed(9))
        for name, weight in trainer.net.named_parameters():
            if name.endswith(("q_norm.weight", "k_norm.weight")):
                weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(len(name)))
    seq = toy_sequences(target)[4]
    from diffdraft.train.trainer import make_batch

    batch = make_batch([seq], 64, 0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        logits, labels = trainer.task.logits_and_labels(batch, gen, training=False)  # [1, nb, G-1, V]
    anchors, _ = sample_anchors(batch["lengths"], batch["starts"], 3, torch.Generator().manual_seed(0))
    drafter = BlockDiffusionDrafter(target, trainer.net, trainer.task.tap_layers)
    for j, anchor in enumerate(anchors[0].tolist()):
        prefix = seq.tokens[: anchor + 1]  # context = tokens before the anchor; the anchor is the known token
        out = target.prefill(target.new_state(), torch.tensor([prefix[:-1]]), want_taps=True)
        state = drafter.new_state()
        drafter.begin(state, prefix[:-1], out.taps)
        draft = drafter.propose(state, prefix, G - 1, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0))
        expected = torch.softmax(logits[0, j].float(), dim=-1)  # [G-1, V]
        assert torch.allclose(draft.probs, expected, atol=1e-5), f"block {j} at anchor {anchor}"


def test_the_distillation_teacher_is_the_targets_next_token_law(tiny_model, tiny_tokenizer, tmp_path):
    """Slot k of a block at anchor a is the token a+k; its teacher is the target's own logits at a+k-1."""
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    trainer = trainer_for(target, tmp_path, kind="dflash", distill_weight=1.0)
    seq = toy_sequences(target)[4]
    from diffdraft.train.trainer import make_batch

    batch = make_batch([seq], 64, 0)
    with torch.no_grad():
        _, labels, teacher = trainer.task.logits_and_labels(batch, torch.Generator().manual_seed(0), training=False,
                                                            teacher=True)
        full = tiny_model(torch.tensor([seq.tokens])).logits[0]  # [L, V]
    anchors, _ = sample_anchors(batch["lengths"], batch["starts"], 3, torch.Generator().manual_seed(0))
    for j, anchor in enumerate(anchors[0].tolist()):
        for k in range(G - 1):
            if labels[0, j, k] != IGNORE:
                assert torch.allclose(teacher[0, j, k], full[anchor + k], atol=1e-4), (j, k)


def test_distillation_loss_by_hand():
    from diffdraft.train.losses import distillation_loss

    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(2, 3, 4, 7, generator=gen)
    labels = torch.randint(0, 7, (2, 3, 4), generator=gen)
    labels[0, 0, 2:] = IGNORE
    weights = positional_weights(4, 7.0)
    assert float(distillation_loss(teacher * 1.0, teacher, labels, weights)) == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(2, 3, 4, 7, generator=gen)
    p, log_q = teacher.log_softmax(-1), other.log_softmax(-1)
    kl = (p.exp() * (p - log_q)).sum(-1)  # [2, 3, 4]
    w = weights.expand_as(kl) * (labels != IGNORE)
    assert float(distillation_loss(other, teacher, labels, weights)) == pytest.approx(float((kl * w).sum() / w.sum()))


def test_training_with_distillation_lowers_the_loss(tiny_model, tiny_tokenizer, tmp_path):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    trainer = trainer_for(target, tmp_path, steps=12, kind="dflash", distill_weight=1.0)
    losses = [trainer.train_step() for _ in range(12)]
    assert sum(losses[-3:]) < sum(losses[:3])


def test_context_cache_grows_through_observe(tiny_model, tiny_tokenizer):
    """Filling the context cache in pieces (begin + observe) equals filling it at once."""
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    net = tiny_net(target, num_taps=2)
    tokens = list(range(40, 60))
    drafter = BlockDiffusionDrafter(target, net, (1, 3))
    out = target.prefill(target.new_state(), torch.tensor([tokens[:-1]]), want_taps=True)
    one = drafter.new_state()
    drafter.begin(one, tokens[:-1], out.taps)
    whole = drafter.propose(one, tokens, G - 1, SamplingConfig(temperature=1.0), None).probs
    pieces = drafter.new_state()
    drafter.begin(pieces, tokens[:8], out.taps[:, :8])
    drafter.observe(pieces, out.taps[:, 8:13])
    drafter.observe(pieces, out.taps[:, 13:])
    assert torch.allclose(drafter.propose(pieces, tokens, G - 1, SamplingConfig(temperature=1.0), None).probs, whole,
                          atol=1e-6)


# ------------------------------------------------------------------ training
def test_training_lowers_the_loss(tiny_model, tiny_tokenizer, tmp_path):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    trainer = trainer_for(target, tmp_path, steps=30)
    before = trainer.evaluate()["eval_loss"]
    for _ in range(30):
        trainer.train_step()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.1, (before, after)


def test_resume_after_interrupt_matches_uninterrupted_run(tiny_model, tiny_tokenizer, tmp_path):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    straight = trainer_for(target, tmp_path / "a", steps=6)
    for _ in range(6):
        straight.train_step()

    first = trainer_for(target, tmp_path / "b", steps=6)
    for _ in range(3):
        first.train_step()
    first.save_checkpoint(tmp_path / "b" / "ckpt")
    del first
    resumed = trainer_for(target, tmp_path / "c", steps=6)
    resumed.load_checkpoint(tmp_path / "b" / "ckpt")
    assert resumed.step == 3
    for _ in range(3):
        resumed.train_step()
    for (name, a), (_, b) in zip(straight.net.state_dict().items(), resumed.net.state_dict().items()):
        assert torch.equal(a, b), name
    a_state, b_state = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert a_state.keys() == b_state.keys()
    for index in a_state:
        assert torch.equal(a_state[index]["exp_avg_sq"], b_state[index]["exp_avg_sq"]), index


def test_train_command_end_to_end(tiny_model_dir, tmp_path):
    """`diffdraft train` on shards from write_shard: writes a drafter that build_drafter loads."""
    from diffdraft.cli import main
    from diffdraft.loading import load_model
    from diffdraft.train.data import write_shard

    model, tokenizer = load_model(tiny_model_dir)
    target = build_target(model, tokenizer)
    seqs = toy_sequences(target)
    write_shard(tmp_path / "train-00000.safetensors", seqs[:4])
    write_shard(tmp_path / "eval-00000.safetensors", seqs[4:])
    rc = main(["train", "--kind", "block-diffusion", "--data", str(tmp_path), "--out", str(tmp_path / "run"),
               "--model", tiny_model_dir, "--layers", "1", "--block-size", str(G), "--tap-layers", "1,2", "--blocks", "2", "--batch-size", "2",
               "--steps", "3", "--eval-every", "3", "--save-every", "3", "--amp", "float32"])
    assert rc == 0
    assert (tmp_path / "run" / "log.jsonl").is_file()
    drafter = build_drafter(str(tmp_path / "run" / "drafter"), target)
    assert isinstance(drafter, BlockDiffusionDrafter) and drafter.tap_layers == (1, 2)


# ------------------------------------------------------------------ checkpoints and fit
def test_mismatched_drafter_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    net = tiny_net(target, num_taps=2)
    save_drafter(tmp_path / "ok", net, (1, 2), target_signature(target))
    assert isinstance(build_drafter(str(tmp_path / "ok"), target), BlockDiffusionDrafter)

    wider = build_target(make_llama(hidden=96, heads=4, kv_heads=2), tiny_tokenizer)
    with pytest.raises(DiffdraftError, match="width"):
        build_drafter(str(tmp_path / "ok"), wider)
    deeper = build_target(make_llama(layers=6), tiny_tokenizer)
    with pytest.raises(DiffdraftError, match="layer count"):
        build_drafter(str(tmp_path / "ok"), deeper)
    other_vocab = build_target(make_llama(vocab_size=320), make_tokenizer(320))
    with pytest.raises(DiffdraftError, match="vocabulary"):
        build_drafter(str(tmp_path / "ok"), other_vocab)
    bad_signature = dict(target_signature(target), tokenizer="0" * 16)
    save_drafter(tmp_path / "tok", net, (1, 2), bad_signature)
    with pytest.raises(DiffdraftError, match="tokenizer"):
        build_drafter(str(tmp_path / "tok"), target)
    save_drafter(tmp_path / "taps", net, (1, 9), target_signature(target))
    with pytest.raises(DiffdraftError, match="taps layers"):
        build_drafter(str(tmp_path / "taps"), target)


def test_a_drafter_for_a_deeper_target_names_that_target(tiny_model, tiny_tokenizer, tmp_path):
    """Before any backend is built (the taps it must read are chosen first), the refusal names the target
    the drafter was trained for, not just a layer number."""
    deep = build_target(make_llama(layers=6), tiny_tokenizer, tap_layers=(1, 5), name="deep-llama")
    save_drafter(tmp_path / "deep", tiny_net(deep, num_taps=2), (1, 5), target_signature(deep))
    with pytest.raises(DiffdraftError, match="reads layer 5, and was trained for a target of 6 layers"):
        required_tap_layers([str(tmp_path / "deep")], num_layers=4)
    assert required_tap_layers([str(tmp_path / "deep")], num_layers=6) == (1, 5)


def test_damaged_drafter_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    net = tiny_net(target, num_taps=2)
    save_drafter(tmp_path / "d", net, (1, 2), target_signature(target))
    weights = tmp_path / "d" / "drafter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DiffdraftError, match="corrupt drafter weights"):
        build_drafter(str(tmp_path / "d"), target)
    save_drafter(tmp_path / "e", tiny_net(target, num_taps=3), (1, 2), target_signature(target))
    with pytest.raises(DiffdraftError, match="inconsistent"):
        build_drafter(str(tmp_path / "e"), target)


def test_bf16_checkpoint_round_trip(tiny_model, tiny_tokenizer, tmp_path):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    net = tiny_net(target, num_taps=2)
    save_drafter(tmp_path / "d", net, (1, 2), target_signature(target), dtype=torch.bfloat16)
    loaded = build_drafter(str(tmp_path / "d"), target).net
    for (name, a), (_, b) in zip(net.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b.float()), name


# ------------------------------------------------------------------ losslessness
@pytest.mark.parametrize("draft_len", [1, 3, 8])
def test_greedy_equals_plain_decoding(tiny_model, tiny_tokenizer, draft_len):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    drafter = BlockDiffusionDrafter(target, tiny_net(target, num_taps=2, layers=2), (1, 3))
    prompt = tiny_tokenizer("The quick brown fox")["input_ids"]
    plain = SpeculativeEngine(target, None).generate(prompt, 40)
    spec = SpeculativeEngine(target, drafter, DraftConfig(draft_len, **FIXED)).generate(prompt, 40)
    assert spec.tokens == plain.tokens


def test_greedy_with_a_drafter_that_is_often_right(tiny_model, tiny_tokenizer, tmp_path):
    """A drafter trained briefly on the target's own greedy text gets acceptances, and output stays exact."""
    from diffdraft.train.data import Sequence
    from diffdraft.train.trainer import DrafterTrainer

    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    prompts = [tiny_tokenizer(t)["input_ids"] for t in ["abc", "hello", "xyz 1", "Once"]]
    seqs = [Sequence(p + SpeculativeEngine(target, None).generate(p, 30).tokens, len(p)) for p in prompts]
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), num_layers=1, block_size=G, tap_layers=(1, 3),
                      blocks_per_sequence=8, batch_size=4, steps=60, lr=1e-2, warmup_steps=1, amp="float32",
                      kind="block-diffusion")
    trainer = DrafterTrainer(cfg, target, seqs, seqs)
    for _ in range(60):
        trainer.train_step()
    drafter = BlockDiffusionDrafter(target, trainer.net, trainer.task.tap_layers)
    for prompt, seq in zip(prompts, seqs):
        result = SpeculativeEngine(target, drafter, DraftConfig(G - 1, **FIXED)).generate(prompt, 30)
        assert result.tokens == seq.tokens[len(prompt):]
    assert result.stats.tau > 1.0


def test_reduced_draft_vocabulary(tiny_model, tiny_tokenizer, tmp_path):
    """A drafter limited to a few ids proposes only those, states q with zeros elsewhere, stays exact,
    and keeps its vocabulary through a checkpoint."""
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    vocab = torch.tensor([5, 40, 41, 97, 98, 99])
    net = tiny_net(target, num_taps=2)
    drafter = BlockDiffusionDrafter(target, net, (1, 3), draft_vocab=vocab)
    prompt = tiny_tokenizer("abcabc")["input_ids"]
    out = target.prefill(target.new_state(), torch.tensor([prompt[:-1]]), want_taps=True)
    state = drafter.new_state()
    drafter.begin(state, prompt[:-1], out.taps)
    draft = drafter.propose(state, prompt, G - 1, SamplingConfig(temperature=1.0), torch.Generator().manual_seed(0))
    assert set(draft.tokens.tolist()) <= set(vocab.tolist())
    outside = torch.ones(target.vocab_size, dtype=torch.bool)
    outside[vocab] = False
    assert torch.allclose(draft.probs.sum(-1), torch.ones(G - 1)) and float(draft.probs[:, outside].abs().max()) == 0
    plain = SpeculativeEngine(target, None).generate(prompt, 30)
    assert SpeculativeEngine(target, drafter, DraftConfig(G - 1, **FIXED)).generate(prompt, 30).tokens == plain.tokens
    save_drafter(tmp_path / "d", net, (1, 3), target_signature(target), draft_vocab=vocab)
    assert torch.equal(build_drafter(str(tmp_path / "d"), target).draft_vocab, vocab)
    bad = torch.tensor([5, 10_000])
    with pytest.raises(DiffdraftError, match="draft vocabulary"):
        BlockDiffusionDrafter(target, net, (1, 3), draft_vocab=bad)


@pytest.mark.parametrize("draft_vocab, sharpness, q_scale", [(None, 30, 1.0), ([0, 2], 30, 1.0), (None, 8, 4.0)])
def test_sampling_law_through_the_engine(draft_vocab, sharpness, q_scale):
    """T = 1 with rejection sampling (the drafter's q is exact, with the full or a reduced draft
    vocabulary, and with a calibrated q scale): the first 3 tokens follow the target's law computed
    by enumeration (chi-square, alpha 1e-4, N = 600 seeded runs)."""
    from test_engine import LAW_PROMPT, engine_samples, exact_law, make_small_target

    target = make_small_target()
    net = tiny_net(target, num_taps=2)
    with torch.no_grad():  # a confident, often-wrong drafter makes rejections common; a q scale softens it
        net.norm.weight.mul_(sharpness)
    vocab = torch.tensor(draft_vocab) if draft_vocab else None
    drafter = BlockDiffusionDrafter(target, net, (1, 2), draft_vocab=vocab, q_scale=q_scale)
    sampling = SamplingConfig(temperature=1.0)
    engine = SpeculativeEngine(target, drafter, DraftConfig(3, **FIXED), sampling)
    samples, accepted = engine_samples(engine, 600)
    result = fit(samples, exact_law(target, LAW_PROMPT, sampling))
    assert result.ok, str(result)
    assert 0 in accepted and max(accepted) >= 2
