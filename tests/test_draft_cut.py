"""Confidence-based draft cutting (DraftConfig.min_confidence): the rule by hand, and losslessness.

The engine verifies only the longest draft prefix whose product of drafter confidences
stays above a threshold. Confidences are each slot's top probability, decided before the
slot's token is drawn, so rejection sampling stays exact; a cut on the drawn token's own
probability (a negative control) skews the law and must fail the same check.
"""

from __future__ import annotations

import pytest
import torch

from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.drafters import BlockDiffusionDrafter
from diffdraft.drafters.base import Draft
from diffdraft.engine import SpeculativeEngine, confident_length
from diffdraft.errors import DiffdraftError
from diffdraft.backends import build_target
from diffdraft.target import TargetBackend
from lawcheck import fit
from test_block_diffusion import TAPS, tiny_net
from conftest import FIXED


def draft_with(confidence, n: int = 4):
    return Draft(tokens=torch.arange(n), probs=None, confidence=None if confidence is None else torch.tensor(confidence))


def test_confident_length_by_hand():
    draft = draft_with([0.9, 0.8, 0.5, 0.9])  # prefix products 0.9, 0.72, 0.36, 0.324
    assert confident_length(draft, 4, 0.5) == 2
    assert confident_length(draft, 4, 0.85) == 1
    assert confident_length(draft, 4, 0.95) == 0
    assert confident_length(draft, 4, 0.0) == 4  # off
    assert confident_length(draft, 1, 0.5) == 1  # the draft length still caps it
    assert confident_length(draft_with(None), 3, 0.5) == 3  # a drafter without confidences is not cut


@pytest.mark.parametrize("value", [-0.1, 1.0, float("nan"), True])
def test_bad_min_confidence_is_refused(value):
    with pytest.raises(DiffdraftError, match="min confidence"):
        DraftConfig(min_confidence=value)


def test_greedy_output_is_unchanged_and_drafts_get_shorter(tiny_model, tiny_tokenizer):
    target = build_target(tiny_model, tiny_tokenizer, tap_layers=TAPS)
    drafter = BlockDiffusionDrafter(target, tiny_net(target, num_taps=2, layers=2), (1, 3))
    prompt = tiny_tokenizer("The quick brown fox")["input_ids"]
    plain = SpeculativeEngine(target, None).generate(prompt, 40)
    full = SpeculativeEngine(target, drafter, DraftConfig(3, **FIXED)).generate(prompt, 40)
    cut = SpeculativeEngine(target, drafter, DraftConfig(3, min_confidence=0.05, **FIXED)).generate(prompt, 40)
    assert cut.tokens == plain.tokens == full.tokens
    assert sum(cut.stats.proposed) < sum(full.stats.proposed)


class CutOnDrawnToken(BlockDiffusionDrafter):
    """Negative control: reports the drawn token's own probability as its confidence, so the cut
    depends on the value drawn and the kept tokens no longer follow q."""

    def propose(self, state, tokens, num_tokens, sampling, generator):
        draft = super().propose(state, tokens, num_tokens, sampling, generator)
        drawn = draft.probs.gather(1, draft.tokens[:, None]).squeeze(1)
        return Draft(tokens=draft.tokens, probs=draft.probs, confidence=drawn)


def law_with_cut(drafter_class, runs: int = 600):
    from test_engine import LAW_PROMPT, engine_samples, exact_law, make_small_target

    target = make_small_target()
    net = tiny_net(target, num_taps=2)
    with torch.no_grad():
        net.norm.weight.mul_(4)  # a drafter sure of some slots and unsure of others
    sampling = SamplingConfig(temperature=1.0)
    engine = SpeculativeEngine(target, drafter_class(target, net, (1, 2)),
                               DraftConfig(3, verify="rejection", min_confidence=0.5, **FIXED), sampling)
    samples, proposed = engine_samples(engine, runs, trace="proposed")
    return fit(samples, exact_law(target, LAW_PROMPT, sampling)), proposed


def test_cut_drafts_keep_the_sampling_law():
    result, proposed = law_with_cut(BlockDiffusionDrafter)
    assert result.ok, str(result)
    assert len(set(proposed)) > 1  # drafts were cut to different lengths


def test_a_cut_on_the_drawn_token_fails_the_law_check():
    result, _ = law_with_cut(CutOnDrawnToken)
    assert not result.ok, str(result)


def test_bench_spec_takes_a_cut():
    from diffdraft.bench.decoders import parse_drafter_spec, split_engine_options

    name, spec, g = parse_drafter_spec("block-diffusion:cut=0.3@16", 8)
    assert name == "block-diffusion:cut=0.3@16" and g == 16
    assert split_engine_options(spec) == ("block-diffusion", {"min_confidence": 0.3})
    assert split_engine_options("runs/md:steps=2:cut=0.5:order=confidence") == (
        "runs/md:steps=2:order=confidence", {"min_confidence": 0.5})
    assert split_engine_options("ngram") == ("ngram", {})
    assert split_engine_options("block-diffusion:length=fixed:propose=sample") == (
        "block-diffusion", {"length": "fixed", "proposals": "sample"})
    with pytest.raises(DiffdraftError, match="bad cut"):
        split_engine_options("ngram:cut=high")


def test_cli_generate_refuses_a_bad_min_confidence(capsys):
    from diffdraft.cli import main

    assert main(["generate", "hi", "--min-confidence", "1.5"]) == 2
    err = capsys.readouterr().err
    assert "--min-confidence: expected a fraction in [0, 1)" in err and "Traceback" not in err
