"""The training objectives: each loss piece on hand-made probabilities, worked out by hand.

Covers the expected-accepted-length function shared by the chain loss and draft selection,
first-error focal weights, the chain loss and its gradient, the stage-II alignment weights,
the two-stage schedule and how the Objective composes the pieces.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from diffdraft.config import TrainConfig
from diffdraft.errors import DiffdraftError
from diffdraft.expected_length import log_expected_accepted_length
from diffdraft.train.losses import (
    alignment_weights,
    chain_loss,
    first_error_weights,
    positional_weights,
    weighted_block_loss,
)
from diffdraft.train.masks import IGNORE
from diffdraft.train.objectives import Objective


def logits_for(true_probs: list[list[float]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Blocks whose slot k gives the true token (id 0) probability p, the other id (1) 1-p.

    -> logits [1, nb, n, 2], labels [1, nb, n] (all 0).
    """
    p = torch.tensor(true_probs)
    logits = torch.stack([p.log(), (1 - p).log()], dim=-1)[None]
    return logits, torch.zeros(p.shape, dtype=torch.long)[None]


# ------------------------------------------------------------------ expected accepted length
def test_expected_length_by_hand():
    log_p = torch.tensor([0.5, 0.5, 0.5]).log()
    assert math.exp(float(log_expected_accepted_length(log_p))) == pytest.approx(0.5 + 0.25 + 0.125)
    # a missing slot ends the chain: nothing after it can be accepted
    valid = torch.tensor([True, False, True])
    assert math.exp(float(log_expected_accepted_length(log_p, valid))) == pytest.approx(0.5)
    assert float(log_expected_accepted_length(log_p, torch.zeros(3, dtype=torch.bool))) == -math.inf


def test_expected_length_is_stable_for_tiny_probabilities():
    log_p = torch.full((40,), -200.0)  # p = e^-200: a naive product underflows to 0, log 0 = -inf
    assert float(log_expected_accepted_length(log_p)) == pytest.approx(-200.0, abs=1e-4)


# ------------------------------------------------------------------ first-error focal
def test_first_error_weights_by_hand():
    predicted = torch.tensor([[[1, 2, 3], [1, 9, 3], [9, 2, 3], [9, 9, 9]]])
    labels = torch.tensor([[[1, 2, 3], [1, 2, 3], [1, 2, IGNORE], [IGNORE] * 3]])
    logits = F.one_hot(predicted, 10).float()
    weights = first_error_weights(logits, labels, focal_lambda=2.0)
    assert weights.tolist() == [[[1, 1, 1], [1, 3, 1], [3, 1, 1], [1, 1, 1]]]


def test_focal_loss_by_hand():
    """Two slots with true-token probabilities 0.6 (argmax right) and 0.4 (argmax wrong)."""
    logits, labels = logits_for([[0.6, 0.4]])
    objective = Objective(gamma=None, focal_lambda=1.0)
    expected = (1 * -math.log(0.6) + 2 * -math.log(0.4)) / 3
    assert float(objective.loss(logits, labels)) == pytest.approx(expected, rel=1e-6)


# ------------------------------------------------------------------ chain loss
def test_chain_loss_by_hand():
    logits, labels = logits_for([[0.5, 0.25], [0.8, 0.5]])
    e1, e2 = 0.5 + 0.5 * 0.25, 0.8 + 0.8 * 0.5
    assert float(chain_loss(logits, labels)) == pytest.approx(-(math.log(e1) + math.log(e2)) / 2, rel=1e-6)
    labels[0, 0, 1] = IGNORE  # the block ends after one slot
    assert float(chain_loss(logits, labels)) == pytest.approx(-(math.log(0.5) + math.log(e2)) / 2, rel=1e-6)
    labels[0, 0, 0] = IGNORE  # a block with nothing to score does not count
    assert float(chain_loss(logits, labels)) == pytest.approx(-math.log(e2), rel=1e-6)


def test_chain_loss_gradient_favours_early_slots():
    """d(-log E)/d(log p_i) = -(sum_{k>=i} prod_{j<=k} p_j) / E: slot 1 gates everything after it."""
    log_p = torch.tensor([0.5, 0.25]).log().requires_grad_(True)
    (-log_expected_accepted_length(log_p)).backward()
    e = 0.5 + 0.125
    assert log_p.grad.tolist() == pytest.approx([-(0.5 + 0.125) / e, -0.125 / e])


def test_chain_loss_step_lengthens_the_expected_accepted_prefix():
    """One gradient step on the logits raises E, and raises it more than a uniform cross-entropy
    step of the same size: the chain loss spends its gradient where the prefix breaks."""
    base, labels = logits_for([[0.3, 0.9, 0.9, 0.9]])

    def expected_length(logits):
        return math.exp(float(log_expected_accepted_length(logits.log_softmax(-1)[..., 0])))

    gains = {}
    for name, loss_fn in (("chain", chain_loss),
                          ("uniform", lambda lg, lb: weighted_block_loss(lg, lb, positional_weights(4, None)))):
        logits = base.clone().requires_grad_(True)
        loss_fn(logits, labels).backward()
        step = logits.grad / logits.grad.norm()
        gains[name] = expected_length(base - 0.5 * step) - expected_length(base)
    assert gains["chain"] > 0 and gains["chain"] > gains["uniform"], gains


# ------------------------------------------------------------------ two-stage alignment
def test_alignment_weights_by_hand():
    weights = alignment_weights(4, torch.tensor([2, 4]), alpha=2.0)
    assert weights.tolist() == [[2, 1, 0, 0], [8, 4, 2, 1]]


def test_two_stage_schedule():
    objective = Objective(align_fraction=0.25)
    assert [objective.stage(s, 8) for s in range(8)] == [1] * 6 + [2] * 2
    assert {Objective().stage(s, 8) for s in range(8)} == {1}


def test_stage_two_loss_by_hand():
    """Stage II with the generator's R per block: only slots i <= R count, weighted alpha^(R-i)."""
    logits, labels = logits_for([[0.5, 0.25, 0.8], [0.9, 0.6, 0.3]])
    objective = Objective(gamma=None, align_alpha=2.0, align_max_masked=96)
    got = objective.loss(logits, labels, stage=2, generator=torch.Generator().manual_seed(5))
    spans = torch.randint(1, 4, (1, 2), generator=torch.Generator().manual_seed(5))[0].tolist()
    probs = [[0.5, 0.25, 0.8], [0.9, 0.6, 0.3]]
    num = den = 0.0
    for r, block in zip(spans, probs):
        for i in range(1, r + 1):
            w = 2.0 ** (r - i)
            num += w * -math.log(block[i - 1])
            den += w
    assert float(got) == pytest.approx(num / den, rel=1e-6)


def test_objective_composes_all_pieces():
    logits, labels = logits_for([[0.6, 0.4, 0.7]])
    objective = Objective(gamma=2.0, focal_lambda=1.0, chain_weight=0.5)
    w = positional_weights(3, 2.0) * torch.tensor([1.0, 2.0, 1.0])  # slot 2 is the first error
    expected = weighted_block_loss(logits, labels, w) + 0.5 * chain_loss(logits, labels)
    assert float(objective.loss(logits, labels)) == pytest.approx(float(expected), rel=1e-6)


@pytest.mark.parametrize("field, value", [("focal_lambda", -1.0), ("chain_weight", float("nan")),
                                          ("align_fraction", 1.0), ("align_alpha", 0.0), ("kind", "eagle")])
def test_bad_objective_settings_are_refused(field, value):
    with pytest.raises(DiffdraftError):
        TrainConfig(data="d", out="o", **{field: value})


def test_autocast_dtype_follows_the_device():
    """bf16 autocast only where it is fast: CUDA. On CPU it is emulated (a step took about 7x longer)."""
    assert TrainConfig(data="d", out="o").amp_dtype == "float32"
    assert TrainConfig(data="d", out="o", device="cuda").amp_dtype == "bfloat16"
    assert TrainConfig(data="d", out="o", amp="bfloat16").amp_dtype == "bfloat16"
    with pytest.raises(DiffdraftError, match="amp"):
        TrainConfig(data="d", out="o", amp="int8")


def test_default_objective_is_the_ablation_best_row_for_block_diffusion_only():
    # positional + focal + chain for the conditioned drafter; the standalone drafter's
    # masked-diffusion objective has no such terms, so it keeps them at 0 unless told.
    conditioned = TrainConfig(data="d", out="o")
    assert (conditioned.gamma, conditioned.focal_lambda, conditioned.chain_weight) == (7.0, 1.0, 1.0)
    standalone = TrainConfig(data="d", out="o", kind="masked-diffusion")
    assert (standalone.focal_lambda, standalone.chain_weight) == (0.0, 0.0)
    explicit = TrainConfig(data="d", out="o", focal_lambda=0.0, chain_weight=0.5)
    assert (explicit.focal_lambda, explicit.chain_weight) == (0.0, 0.5)
    assert TrainConfig.from_dict(conditioned.to_dict()) == conditioned
