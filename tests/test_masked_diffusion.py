"""The standalone masked-diffusion drafter: mask, network, train/decode consistency, decoding
paths (steps, reveal order, self-selection, warm-up hand-off) and their losslessness.

Tiny random Llama targets from conftest.py; the drafter starts as a copy of the target's
first layers, so a broken copy, rope or cache shows up as a numeric mismatch.
"""

from __future__ import annotations

import pytest
import torch

from diffdraft.config import DraftConfig, SamplingConfig, TrainConfig
from diffdraft.drafters import HandoffDrafter, MaskedDiffusionDrafter, NgramDrafter, build_drafter
from diffdraft.drafters.base import Draft, Drafter
from diffdraft.drafters.block_diffusion import target_signature
from diffdraft.drafters.masked_diffusion import DenoiseConfig, reveal_counts, save_masked_drafter
from diffdraft.engine import SpeculativeEngine
from diffdraft.errors import DiffdraftError
from diffdraft.expected_length import log_expected_accepted_length
from diffdraft.models.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionNet
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from diffdraft.train.masks import prefix_and_blocks_mask, sample_block_masking
from diffdraft.train.tasks import layer_shape
from lawcheck import fit
from conftest import FIXED

G = 4


def tiny_net(target: TargetBackend, layers: int = 1, seed: int = 0, from_target: bool = True) -> MaskedDiffusionNet:
    net = MaskedDiffusionNet(MaskedDiffusionConfig(num_layers=layers, block_size=G, **layer_shape(target)))
    net.reset_parameters(torch.Generator().manual_seed(seed))
    if from_target:
        net.init_from_target(target.module)
    with torch.no_grad():  # a visible mask embedding, so a broken mask path changes the output
        net.mask_embedding.normal_(generator=torch.Generator().manual_seed(seed + 1))
    return net


# ------------------------------------------------------------------ masks and schedules
def test_prefix_and_blocks_mask_enumerated():
    """Prefix rows: causal, no block. Slot k of block j: prefix positions < anchor_j and block j."""
    anchors, length, g = torch.tensor([[1, 3]]), 5, 2
    mask = prefix_and_blocks_mask(anchors, length, g)[0, 0]
    assert mask.shape == (length + 2 * g, length + 2 * g)
    for row in range(length):
        assert mask[row].tolist() == [c <= row for c in range(length)] + [False] * (2 * g)
    for j, anchor in enumerate([1, 3]):
        for k in range(g):
            expected = [c < anchor for c in range(length)] + [(i // g) == j for i in range(2 * g)]
            assert mask[length + j * g + k].tolist() == expected


def test_block_masking_always_masks_something():
    masked = sample_block_masking((500, 3), torch.Generator().manual_seed(0))
    assert masked.any(dim=-1).all() and not masked.all()  # random ratios: some blocks keep slots


def test_reveal_counts():
    assert reveal_counts(7, 1) == [7]
    assert reveal_counts(7, 2) == [4, 3]
    assert reveal_counts(7, 4) == [2, 2, 2, 1]
    assert reveal_counts(2, 4) == [1, 1]  # never an empty step


# ------------------------------------------------------------------ network
def test_copied_layers_reproduce_the_target(tiny_model, tiny_tokenizer):
    """All target layers copied, run causally: the target's own logits (checks weights, rope, norms)."""
    target = build_target(tiny_model, tiny_tokenizer)
    net = tiny_net(target, layers=target.num_layers)
    ids = torch.tensor([tiny_tokenizer("copy me exactly")["input_ids"]])
    n = ids.shape[1]
    causal = torch.ones(n, n, dtype=torch.bool).tril()[None, None]
    hidden, _ = net(target.embed_tokens(ids), torch.arange(n)[None], None, causal)
    with torch.no_grad():
        expected = tiny_model(ids).logits
    assert torch.allclose(target.lm_head(hidden), expected, atol=1e-4)


def test_training_forward_equals_decode_time_drafter(tiny_model, tiny_tokenizer, tmp_path):
    """The training pass (prefix + many blocks under one mask, all slots masked) and the drafter
    (its own cache, one block, T = 1) give the same q for the same block."""
    from test_block_diffusion import toy_sequences
    from diffdraft.train.trainer import DrafterTrainer, make_batch

    target = build_target(tiny_model, tiny_tokenizer)
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), kind="masked-diffusion", num_layers=2,
                      block_size=G, blocks_per_sequence=3, batch_size=2, steps=2, warmup_steps=1, amp="float32")
    trainer = DrafterTrainer(cfg, target, toy_sequences(target), toy_sequences(target))
    with torch.no_grad():
        trainer.net.mask_embedding.normal_(generator=torch.Generator().manual_seed(9))
    seq = toy_sequences(target)[3]
    batch = make_batch([seq], 512, 0)
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        logits, labels = trainer.task.logits_and_labels(batch, gen, training=False)  # [1, nb, G-1, V]
    from diffdraft.train.masks import sample_anchors

    anchors, _ = sample_anchors(batch["lengths"], batch["starts"], 3, torch.Generator().manual_seed(4))
    drafter = MaskedDiffusionDrafter(target, trainer.net)
    state = drafter.new_state()
    drafter.begin(state, seq.tokens[: seq.prompt_len], None)
    for j, anchor in enumerate(anchors[0].tolist()):
        draft = drafter.propose(state, seq.tokens[: anchor + 1], G - 1, SamplingConfig(temperature=1.0), None)
        assert torch.allclose(draft.probs, logits[0, j].softmax(-1), atol=1e-5), j


def test_cache_follows_the_token_list(tiny_model, tiny_tokenizer):
    """After a rejected draft the token list shrinks or changes: the cache follows it exactly."""
    target = build_target(tiny_model, tiny_tokenizer)
    net = tiny_net(target, layers=2)
    greedy = SamplingConfig()
    long = tiny_tokenizer("abcdefghij")["input_ids"]
    other = long[:6] + tiny_tokenizer("xyz")["input_ids"]
    drafter = MaskedDiffusionDrafter(target, net)
    warm = drafter.new_state()
    drafter.begin(warm, long[:3], None)
    drafter.propose(warm, long, G - 1, greedy, None)
    got = drafter.propose(warm, other, G - 1, greedy, None).tokens
    fresh = drafter.new_state()
    drafter.begin(fresh, other[:3], None)
    assert torch.equal(got, drafter.propose(fresh, other, G - 1, greedy, None).tokens)


# ------------------------------------------------------------------ decoding paths
def draft_once(target, net, denoise, sampling, prompt, seed=0) -> Draft:
    drafter = MaskedDiffusionDrafter(target, net, denoise=denoise)
    state = drafter.new_state()
    drafter.begin(state, prompt, None)
    return drafter.propose(state, prompt, G - 1, sampling, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("steps, order, exact", [(1, "confidence", True), (3, "left-to-right", True),
                                                 (3, "confidence", False)])
def test_which_drafts_state_an_exact_q(tiny_model, tiny_tokenizer, steps, order, exact):
    target = build_target(tiny_model, tiny_tokenizer)
    prompt = tiny_tokenizer("state q")["input_ids"]
    draft = draft_once(target, tiny_net(target), DenoiseConfig(steps=steps, order=order),
                       SamplingConfig(temperature=1.0), prompt)
    assert (draft.probs is not None) == exact and draft.tokens.shape == (G - 1,)
    if exact:  # every drafted token has positive probability under its stated q
        assert (draft.probs.gather(1, draft.tokens[:, None]) > 0).all()


def candidate(target, net, prompt, steps, sampling, generator=None, order="confidence"):
    """One denoising candidate: (tokens, score = log expected accepted length under the drafter's own q)."""
    drafter = MaskedDiffusionDrafter(target, net, denoise=DenoiseConfig(steps=steps, order=order))
    state = drafter.new_state()
    drafter.begin(state, prompt, None)
    drafter._sync(state, prompt[:-1])
    tokens, _, confidence, _ = drafter._denoise(state, prompt[-1], len(prompt) - 1, G - 1, steps, sampling, generator)
    return tokens, float(log_expected_accepted_length(confidence))


@pytest.mark.parametrize("prompt_text", ["pick the best", "another one", "zz"])
def test_self_selection_picks_the_longest_expected_acceptance(tiny_model, tiny_tokenizer, prompt_text):
    """Greedy, candidates T in {1, 2, 3}: the draft is the candidate with the highest
    sum_k prod_{j<=k} p_j (p = the drafter's own probability of its token), and it carries no q."""
    target = build_target(tiny_model, tiny_tokenizer)
    net = tiny_net(target, layers=2)
    prompt = tiny_tokenizer(prompt_text)["input_ids"]
    greedy = SamplingConfig()
    candidates = [candidate(target, net, prompt, steps, greedy) for steps in (1, 2, 3)]
    best = max(candidates, key=lambda c: c[1])[0]
    selected = draft_once(target, net, DenoiseConfig(order="confidence", candidates=(1, 2, 3)), greedy, prompt)
    assert selected.probs is None and torch.equal(selected.tokens, best)


def test_self_selection_among_samples(tiny_model, tiny_tokenizer):
    """T = 1 sampling, 4 samples: the chosen draft is the best-scoring of the same four samples."""
    target = build_target(tiny_model, tiny_tokenizer)
    net = tiny_net(target, layers=2)
    prompt = tiny_tokenizer("sample and select")["input_ids"]
    sampling = SamplingConfig(temperature=1.0)
    drafter = MaskedDiffusionDrafter(target, net, denoise=DenoiseConfig(steps=1, samples=4))
    state = drafter.new_state()
    drafter.begin(state, prompt, None)
    chosen = drafter.propose(state, prompt, G - 1, sampling, torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)  # replay the same four samples
    samples = [candidate(target, net, prompt, 1, sampling, gen, order="left-to-right") for _ in range(4)]
    assert len({tuple(t.tolist()) for t, _ in samples}) > 1  # the samples differ, so the choice matters
    assert chosen.probs is None and torch.equal(chosen.tokens, max(samples, key=lambda c: c[1])[0])


class RecordingDrafter(Drafter):
    name = "recording"

    def __init__(self):
        self.calls = 0

    def propose(self, state, tokens, num_tokens, sampling, generator):
        self.calls += 1
        return Draft.empty()


def test_handoff_uses_the_warmup_drafter_first(tiny_model, tiny_tokenizer):
    target = build_target(tiny_model, tiny_tokenizer)
    warm, main = RecordingDrafter(), MaskedDiffusionDrafter(target, tiny_net(target))
    handoff = HandoffDrafter(warm, main, warmup_tokens=5)
    prompt = tiny_tokenizer("hand off")["input_ids"]
    result = SpeculativeEngine(target, handoff, DraftConfig(G - 1, **FIXED)).generate(prompt, 20)
    plain = SpeculativeEngine(target, None).generate(prompt, 20)
    assert result.tokens == plain.tokens
    assert warm.calls == 4  # responses of 1..4 tokens: one plain step each (its drafts are empty)
    assert sum(result.stats.proposed) > 0  # then the main drafter drafts


@pytest.mark.parametrize("denoise", [DenoiseConfig(steps=1), DenoiseConfig(steps=2), DenoiseConfig(steps=3, order="confidence"),
                                     DenoiseConfig(order="confidence", candidates=(1, 2, 3))])
def test_greedy_equals_plain_decoding(tiny_model, tiny_tokenizer, denoise):
    target = build_target(tiny_model, tiny_tokenizer)
    drafter = MaskedDiffusionDrafter(target, tiny_net(target, layers=2), denoise=denoise)
    prompt = tiny_tokenizer("The quick brown fox")["input_ids"]
    plain = SpeculativeEngine(target, None).generate(prompt, 40)
    assert SpeculativeEngine(target, drafter, DraftConfig(G - 1, **FIXED)).generate(prompt, 40).tokens == plain.tokens


def law_of_first_tokens(drafter_for, runs: int = 600):
    """Sample 3 tokens at T = 1 through the engine with drafter_for(target); fit against the exact law."""
    from test_engine import LAW_PROMPT, engine_samples, exact_law, make_small_target

    target = make_small_target()
    sampling = SamplingConfig(temperature=1.0)
    engine = SpeculativeEngine(target, drafter_for(target), DraftConfig(3, **FIXED), sampling)
    samples, accepted = engine_samples(engine, runs)
    return fit(samples, exact_law(target, LAW_PROMPT, sampling)), accepted


@pytest.mark.parametrize("denoise", [DenoiseConfig(steps=2), DenoiseConfig(steps=3, order="confidence"),
                                     DenoiseConfig(steps=1, samples=3)])
def test_sampling_law_through_the_engine(denoise):
    """T = 1: left-to-right two-step drafts verified by rejection sampling (exact q), confidence-order
    drafts and self-selected drafts by point-mass matching: the first 3 tokens follow the target's
    law by enumeration (chi-square, alpha 1e-4, N = 600 seeded runs)."""
    result, accepted = law_of_first_tokens(
        lambda target: MaskedDiffusionDrafter(target, tiny_net(target, from_target=False), denoise=denoise))
    assert result.ok, str(result)
    assert 0 in accepted and max(accepted) >= 1


def test_sampling_law_through_a_handoff():
    """T = 1: n-gram drafts (point-mass) for the first token of the response, then left-to-right
    masked-diffusion drafts (rejection sampling): the first 3 tokens still follow the target's law."""
    result, accepted = law_of_first_tokens(lambda target: HandoffDrafter(
        NgramDrafter(), MaskedDiffusionDrafter(target, tiny_net(target, from_target=False),
                                               denoise=DenoiseConfig(steps=2)), warmup_tokens=1))
    assert result.ok, str(result)
    assert 0 in accepted and max(accepted) >= 1


class SelectionClaimingExactQ(MaskedDiffusionDrafter):
    """Negative control: picks the best of 3 samples, then hands over that sample's q as if it
    were the law of the selected draft. Selection skews the law, so rejection sampling is lossy."""

    def propose(self, state, tokens, num_tokens, sampling, generator):
        self._sync(state, tokens[:-1])
        count = min(num_tokens, G - 1)
        best = max((self._denoise(state, tokens[-1], len(tokens) - 1, count, 1, sampling, generator)[:3]
                    for _ in range(3)),
                   key=lambda c: float(log_expected_accepted_length(c[2])))
        return Draft(tokens=best[0], probs=best[1])


def test_selection_claiming_exact_q_fails_the_law_check():
    result, _ = law_of_first_tokens(lambda target: SelectionClaimingExactQ(target, tiny_net(target, from_target=False)))
    assert not result.ok, str(result)


# ------------------------------------------------------------------ training and checkpoints
def test_training_lowers_the_loss(tiny_model, tiny_tokenizer, tmp_path):
    from test_block_diffusion import toy_sequences
    from diffdraft.train.trainer import DrafterTrainer

    target = build_target(tiny_model, tiny_tokenizer)
    cfg = TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), kind="masked-diffusion", num_layers=1,
                      block_size=G, blocks_per_sequence=3, batch_size=2, steps=30, lr=3e-3, warmup_steps=1,
                      amp="float32")
    trainer = DrafterTrainer(cfg, target, toy_sequences(target), toy_sequences(target)[:2])
    before = trainer.evaluate()["eval_loss"]
    for _ in range(30):
        trainer.train_step()
    assert trainer.evaluate()["eval_loss"] < before - 0.1


def test_train_command_and_folder_options(tiny_model_dir, tmp_path):
    """`diffdraft train --kind masked-diffusion --eval-data` writes a folder that build_drafter loads, with options."""
    from test_block_diffusion import toy_sequences
    from diffdraft.cli import main
    from diffdraft.loading import load_model
    from diffdraft.train.data import write_shard

    model, tokenizer = load_model(tiny_model_dir)
    target = build_target(model, tokenizer)
    seqs = toy_sequences(target)
    write_shard(tmp_path / "train-00000.safetensors", seqs[:4])
    (tmp_path / "held").mkdir()
    write_shard(tmp_path / "held" / "eval-00000.safetensors", seqs[4:])  # held-out data from another folder
    rc = main(["train", "--kind", "masked-diffusion", "--data", str(tmp_path), "--eval-data", str(tmp_path / "held"),
               "--out", str(tmp_path / "run"),
               "--model", tiny_model_dir, "--layers", "1", "--block-size", str(G), "--blocks", "2",
               "--batch-size", "2", "--steps", "2", "--eval-every", "2", "--save-every", "2", "--amp", "float32"])
    assert rc == 0
    folder = str(tmp_path / "run" / "drafter")
    drafter = build_drafter(folder, target)
    assert isinstance(drafter, MaskedDiffusionDrafter) and drafter.denoise == DenoiseConfig(steps=1)
    drafter = build_drafter(folder + ":steps=2:order=confidence:select=1,2", target)
    assert drafter.denoise == DenoiseConfig(steps=2, order="confidence", candidates=(1, 2))
    handoff = build_drafter(folder + ":warmup=8", target)
    assert isinstance(handoff, HandoffDrafter) and isinstance(handoff.warmup, NgramDrafter)
    assert handoff.warmup_tokens == 8
    for bad, message in ((":steps=0", "steps"), (":order=random", "order"), (":speed=9", "unknown"),
                         (":steps=two", "bad masked-diffusion option"), (":steps", "key=value")):
        with pytest.raises(DiffdraftError, match=message):
            build_drafter(folder + bad, target)
    with pytest.raises(DiffdraftError, match="takes no options"):
        build_drafter("ngram:steps=2", target)


def test_mismatched_or_damaged_drafter_is_refused(tiny_model, tiny_tokenizer, tmp_path):
    target = build_target(tiny_model, tiny_tokenizer)
    net = tiny_net(target)
    signature = target_signature(target)
    save_masked_drafter(tmp_path / "wide", net, {**signature, "hidden_size": 999})
    with pytest.raises(DiffdraftError, match="width"):
        build_drafter(str(tmp_path / "wide"), target)
    save_masked_drafter(tmp_path / "ok", net, signature)
    weights = tmp_path / "ok" / "drafter.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(DiffdraftError, match="corrupt"):
        build_drafter(str(tmp_path / "ok"), target)
