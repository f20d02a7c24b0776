"""SimSD's step budget (diffdraft.dllm.budget): how many denoising steps a verification drafts, from measured
costs and the acceptance seen; 0 (the dLLM's own step) where drafting does not pay. Whatever it chooses,
greedy SimSD equals the dLLM's own decoding. Tiny random Llamas."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from diffdraft.config import SamplingConfig
from diffdraft.dllm.budget import StepBudget, measure
from diffdraft.dllm.decode import decode
from diffdraft.dllm.drafter import DLLMDrafter
from diffdraft.dllm.runner import DLLMRunner
from diffdraft.dllm.runtime import blocks_for
from diffdraft.dllm.simsd import decode_simsd
from diffdraft.draft_length import CostCurve
from test_dllm_model import converted

PROMPT = [5, 9, 33, 100, 7]
FLAT = tuple([0.010] * 64)  # a forward costs the same whatever its rows (a GPU, say)
STEEP = tuple(0.010 * k for k in range(1, 65))  # every row costs a one-row forward


def test_drafting_that_cannot_pay_is_not_chosen_and_cheap_accepted_drafting_is():
    dear = StepBudget(CostCurve(STEEP, draft_s=0.010), block_size=4)
    assert dear.choose(4, carried=0) == 0  # even a draft accepted whole reveals fewer steps per second
    cheap = StepBudget(CostCurve(FLAT, draft_s=0.004), block_size=4)
    for _ in range(50):
        cheap.observe(4, 4)  # everything accepted
    assert cheap.choose(4, carried=4) == 4
    for _ in range(400):
        cheap.observe(4, 0)  # now nothing is
    assert cheap.choose(4, carried=4) == 0
    assert cheap.choose(0, carried=0) == 0


def test_measure_interpolates_between_block_multiples_and_never_decreases():
    calls = []

    def forward_rows(k):
        calls.append(k)

    curve = measure(forward_rows, lambda: None, block_size=4, most_rows=10)
    assert len(curve.target_s) == 12 and set(calls) == {1, 4, 8, 12}
    assert all(b >= a for a, b in zip(curve.target_s, curve.target_s[1:]))


@pytest.mark.parametrize("costs, drafted", [(CostCurve(STEEP, 0.100), "none"), (CostCurve(FLAT, 0.0001), "some")])
def test_greedy_simsd_under_a_budget_equals_the_own_decoding(tiny_tokenizer, costs, drafted):
    base = make_llama(init_range=0.2)
    target = blocks_for(converted(base, 4, seed=1), "lean", tiny_tokenizer)
    expected = decode(target, PROMPT, 4, max_new_tokens=32).tokens
    budget = StepBudget(costs, block_size=4)
    result = decode_simsd(target, DLLMDrafter(converted(base, 4, 2)), PROMPT, 4, 32, budget=budget)
    assert result.tokens == expected
    assert (sum(result.drafted) == 0) == (drafted == "none")


def test_the_runner_measures_its_budget_once_on_the_lean_runtime_and_only_for_greedy(tiny_tokenizer):
    base = make_llama(init_range=0.2)
    blocks = blocks_for(converted(base, 4, seed=1), "lean", tiny_tokenizer)
    runner = DLLMRunner(blocks, DLLMDrafter(converted(base, 4, seed=1)), steps=4)  # an oracle drafter
    own = DLLMRunner(blocks, None, steps=4)
    greedy = SamplingConfig()
    assert runner.run(PROMPT, 24, greedy, 0).tokens == own.run(PROMPT, 24, greedy, 0).tokens
    budget = runner.budget
    assert budget is not None and len(budget.costs.target_s) >= 24 and budget.costs.draft_s > 0
    runner.run(PROMPT, 8, greedy, 0)
    assert runner.budget is budget  # measured once
    module = DLLMRunner(converted(base, 4, seed=1), DLLMDrafter(converted(base, 4, seed=1)), steps=4)
    module.run(PROMPT, 8, greedy, 0)
    sampled = DLLMRunner(blocks, DLLMDrafter(converted(base, 4, seed=1)), steps=4)
    sampled.run(PROMPT, 8, SamplingConfig(temperature=1.0), 0)
    assert module.budget is None and sampled.budget is None
