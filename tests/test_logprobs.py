"""Log probabilities of emitted tokens (diffdraft.logprobs): the target's own, bit for bit.

On the tiny random Llama (lean runtime, row-invariant): the log probabilities a speculative
answer reports equal those of the same tokens fed to the target one at a time, at T = 0 and
T > 0 with top-k / top-p; and a control that reads the drafter's view instead must differ.
The shaping of a row (sampling.logits_to_logprobs) against logits_to_probs.
"""

from __future__ import annotations

import math

import pytest
import torch

from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.drafters import EarlyExitDrafter, NgramDrafter
from diffdraft.engine import SpeculativeEngine
from diffdraft.errors import DiffdraftError
from diffdraft.logprobs import check_top, token_logprobs
from diffdraft.sampling import logits_to_logprobs, logits_to_probs

PROMPT_TEXT = "abcabcabc The quick brown fox jumps over the lazy dog. abcabc"


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=0.7), SamplingConfig(temperature=1.3, top_k=5),
                                      SamplingConfig(temperature=1.0, top_p=0.6)])
def test_logprobs_are_the_log_of_the_law_tokens_are_drawn_from(sampling):
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3  # [4, V]
    logprobs = logits_to_logprobs(logits, sampling)
    probs = logits_to_probs(logits, sampling)
    assert torch.allclose(logprobs.exp(), probs, atol=1e-6)
    assert torch.equal(torch.isinf(logprobs), probs == 0)  # what top-k / top-p drop is -inf


def test_at_temperature_zero_logprobs_are_the_raw_distribution():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    greedy = SamplingConfig(temperature=0, top_k=2)  # filters do not apply to a point mass's report
    assert torch.equal(logits_to_logprobs(logits, greedy), logits.log_softmax(-1))


def test_token_logprobs_lists_the_best_alternatives_best_first_without_excluded_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 0.0]])
    entries = token_logprobs(logits, [2, 0], SamplingConfig(temperature=1.0, top_k=2), top=3)
    assert [t for t, _ in entries[0].top] == [1, 3]  # two survive top-k; the third best is -inf and left out
    assert entries[0].logprob == -math.inf  # token 2 is outside top-k (a token the engine never emits)
    assert entries[1].top[0][0] == 0 and entries[1].logprob == pytest.approx(-math.log(1 + 3 * math.exp(-5)))
    assert token_logprobs(logits, [1, 0], SamplingConfig(), top=0)[0].top == ()


@pytest.mark.parametrize("top", [-1, 21, 1.5, True])
def test_a_bad_alternative_count_is_refused(top):
    with pytest.raises(DiffdraftError, match="top logprobs"):
        check_top(top)


def teacher_forced(target, prompt: list[int], tokens: list[int], sampling: SamplingConfig, top: int):
    """The reference: the prompt, then each answer token fed alone, one forward per token."""
    state = target.new_state()
    rows = [target.prefill(state, torch.tensor([prompt]), want_taps=False).logits[0, -1]]
    for token in tokens[:-1]:
        rows.append(target.forward(state, torch.tensor([[token]]), want_taps=False).logits[0, -1])
    return token_logprobs(torch.stack(rows), tokens, sampling, top)


@pytest.mark.parametrize("sampling", [SamplingConfig(), SamplingConfig(temperature=1.0),
                                      SamplingConfig(temperature=0.8, top_k=20, top_p=0.9)])
@pytest.mark.parametrize("drafter_kind", ["ngram", "early-exit"])
def test_a_speculative_answer_reports_the_targets_own_logprobs_bit_for_bit(tiny_target, sampling, drafter_kind):
    target = tiny_target
    prompt = target.tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    drafter = NgramDrafter() if drafter_kind == "ngram" else EarlyExitDrafter(target, num_layers=1)
    engine = SpeculativeEngine(target, drafter, draft=DraftConfig(draft_len=4, length="fixed"), sampling=sampling)
    streamed = []
    result = engine.generate(prompt, max_new_tokens=24, seed=3, logprobs=4, on_logprobs=streamed.extend)
    assert result.stats.steps < len(result.tokens)  # some steps accepted drafted tokens
    assert [e.token for e in result.logprobs] == result.tokens and streamed == result.logprobs
    reference = teacher_forced(target, prompt, result.tokens, sampling, top=4)
    assert result.logprobs == reference  # exact: the same rows of the same row-invariant runtime
    assert all(math.isfinite(e.logprob) and len(e.top) == 4 for e in result.logprobs)


def test_the_control_a_drafters_view_differs(tiny_target):
    """The reference check can fail: log probabilities read one row off (the drafter's slot view of a
    block, not the target's row for the token) do not match."""
    target = tiny_target
    prompt = target.tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    result = SpeculativeEngine(target, None).generate(prompt, max_new_tokens=12, logprobs=0)
    shifted = teacher_forced(target, prompt + result.tokens[:1], result.tokens[1:] + [result.tokens[-1]],
                             SamplingConfig(), top=0)
    assert [e.logprob for e in shifted] != [e.logprob for e in result.logprobs]


def test_without_asking_there_are_none(tiny_target):
    prompt = tiny_target.tokenizer(PROMPT_TEXT, add_special_tokens=False)["input_ids"]
    assert SpeculativeEngine(tiny_target, None).generate(prompt, max_new_tokens=4).logprobs is None
