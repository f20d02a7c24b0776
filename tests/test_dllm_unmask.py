"""The unmasking rule and the exact law of a one-slot step, against brute-force enumeration.

step_law (what rejection sampling uses as p and q) is checked against the law obtained by
running the rule over every joint draw of the masked slots' tokens (V**m outcomes, each
with its probability), and choose_step's sampled decisions against step_law by
chi-square (lawcheck.py), with a deliberately wrong law as the negative control.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from diffdraft.config import SamplingConfig
from diffdraft.dllm.model import MASK_ID
from diffdraft.dllm.unmask import Step, choose_step, masked_slots, schedule, step_law
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_probs
from lawcheck import fit

SHAPES = {
    "t1": SamplingConfig(temperature=1.0),
    "t0.7-topk2": SamplingConfig(temperature=0.7, top_k=2),
    "t1.3-topp0.8": SamplingConfig(temperature=1.3, top_p=0.8),
}


def brute_force_law(logits: torch.Tensor, masked: torch.Tensor, sampling: SamplingConfig) -> dict[tuple, float]:
    """Law of (slot, token) of the sampled rule, by enumerating every joint draw of the masked slots."""
    b, vocab = logits.shape
    slots = [p for p in range(b) if masked[p]]
    probs = logits_to_probs(logits.float(), sampling).double()  # [b, V]
    law: dict[tuple, float] = defaultdict(float)
    for draw in itertools.product(range(vocab), repeat=len(slots)):
        weight = 1.0
        for p, x in zip(slots, draw):
            weight *= float(probs[p, x])
        if weight == 0:
            continue
        confidence = {p: float(probs[p, x]) for p, x in zip(slots, draw)}
        winner = min(slots, key=lambda p: (-confidence[p], p))
        law[(winner, draw[slots.index(winner)])] += weight
    return dict(law)


def test_schedule():
    assert schedule(8, 8) == [1] * 8
    assert schedule(8, 3) == [3, 3, 2]
    assert schedule(4, 1) == [4]
    for bad in (0, 9, True, 2.0):
        with pytest.raises(DiffdraftError):
            schedule(8, bad)


def test_greedy_rule_picks_most_confident_slots_ties_low():
    logits = torch.tensor([[0.0, 3.0, 0.0], [5.0, 0.0, 0.0], [0.0, 0.0, 5.0], [1.0, 1.0, 1.0]])
    masked = torch.tensor([True, True, True, True])
    greedy = SamplingConfig()
    assert choose_step(logits, masked, 1, greedy, None) == Step(slots=(1,), tokens=(0,))  # tie 1 vs 2: lower slot
    assert choose_step(logits, masked, 2, greedy, None) == Step(slots=(1, 2), tokens=(0, 2))
    assert choose_step(logits, torch.tensor([True, False, True, True]), 1, greedy, None).slots == (2,)
    assert choose_step(logits, masked, 3, greedy, None).slots == (0, 1, 2)
    with pytest.raises(ValueError):
        choose_step(logits, torch.tensor([True, False, False, False]), 2, greedy, None)


def test_step_apply_and_flat():
    step = Step(slots=(0, 2), tokens=(7, 9))
    assert step.apply([MASK_ID, 3, MASK_ID]) == [7, 3, 9]
    with pytest.raises(ValueError):
        step.apply([1, 3, MASK_ID])
    one = Step(slots=(2,), tokens=(4,))
    assert Step.from_flat(one.flat(10), 10) == one
    assert masked_slots([MASK_ID, 5]).tolist() == [True, False]


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("masked", [[True, True, True], [True, False, True], [False, True, False]])
def test_step_law_equals_enumeration(shape, masked):
    sampling = SHAPES[shape]
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        logits = 1.5 * torch.randn(3, 4, generator=gen)
        mask = torch.tensor(masked)
        law = step_law(logits, mask, sampling).view(3, 4)
        exact = brute_force_law(logits, mask, sampling)
        table = torch.zeros(3, 4, dtype=torch.float64)
        for (p, x), prob in exact.items():
            table[p, x] = prob
        assert torch.allclose(law.double(), table, atol=1e-6), (law, table)
        assert abs(float(law.sum()) - 1) < 1e-5


def test_step_law_with_exact_ties_between_slots():
    # two slots with identical rows: equal confidences happen, and the lower slot must win them
    logits = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    law = step_law(logits, torch.tensor([True, True]), SamplingConfig(temperature=1.0)).view(2, 2)
    exact = brute_force_law(logits, torch.tensor([True, True]), SamplingConfig(temperature=1.0))
    assert torch.allclose(law.double(), torch.tensor([[exact.get((p, x), 0.0) for x in range(2)] for p in range(2)],
                                                     dtype=torch.float64), atol=1e-6)
    assert float(law[1, 1]) == 0.0  # slot 1 never wins with its weaker token: slot 0 ties (lower slot) or beats it


def test_greedy_law_is_one_hot_on_the_greedy_decision():
    logits = torch.tensor([[0.0, 2.0], [4.0, 0.0]])
    law = step_law(logits, torch.tensor([True, True]), SamplingConfig())
    assert law.tolist() == [0.0, 0.0, 1.0, 0.0]


@pytest.mark.parametrize("shape", ["t1", "t1.3-topp0.8"])
def test_sampled_rule_follows_its_law(shape):
    sampling = SHAPES[shape]
    logits = torch.randn(3, 4, generator=torch.Generator().manual_seed(5))
    masked = torch.tensor([True, True, True])
    gen = torch.Generator().manual_seed(6)
    draws = [choose_step(logits, masked, 1, sampling, gen) for _ in range(4000)]
    law = step_law(logits, masked, sampling)
    exact = {(p, x): float(law[p * 4 + x]) for p in range(3) for x in range(4)}
    samples = [(s.slots[0], s.tokens[0]) for s in draws]
    result = fit(samples, exact)
    assert result.ok, str(result)
    # negative control: the product of the slots' token marginals, ignoring the confidence race
    wrong = {(p, x): float(logits_to_probs(logits, sampling)[p, x]) / 3 for p in range(3) for x in range(4)}
    assert not fit(samples, wrong).ok
