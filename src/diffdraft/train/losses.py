"""Per-block training losses over the g-1 masked positions, and acceptance metrics.

Position k = 1..g-1 is the k-th masked slot of a block (the first draft token is k = 1).
The pieces (docs/design.md, 'Training drafters'): positional weights, first-error focal weights, the chain
loss (minus log of the expected accepted length) and the stage-II alignment weights;
train/objectives.py composes them. Knows nothing of models: inputs are logits and labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffdraft.expected_length import log_expected_accepted_length
from diffdraft.train.masks import IGNORE


def positional_weights(num_positions: int, gamma: float | None) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 1..num_positions; gamma None gives uniform weights."""
    k = torch.arange(num_positions, dtype=torch.float32)
    return torch.ones(num_positions) if gamma is None else torch.exp(-k / gamma)


def weighted_block_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy.

    logits: [B, nb, g-1, V]; labels: [B, nb, g-1] (IGNORE where absent); weights: [g-1] (per
    position) or [B, nb, g-1] (per slot).
    """
    nll = F.cross_entropy(logits.flatten(0, 2).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    nll = nll.view(labels.shape)  # [B, nb, g-1]
    w = weights.to(nll.device).expand_as(nll) * (labels != IGNORE)
    return (nll * w).sum() / w.sum().clamp(min=1e-8)


def distillation_loss(logits: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                      weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean KL(p || q) of the target's next-token law p (teacher logits) from the drafter's q.

    logits, teacher: [B, nb, g-1, V]; labels: [B, nb, g-1] (only slots with a label count); weights:
    [g-1] or [B, nb, g-1]. Zero exactly when q = p on every counted slot.
    """
    log_q = logits.float().log_softmax(dim=-1)
    log_p = teacher.float().log_softmax(dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # [B, nb, g-1]
    w = weights.to(kl.device).expand_as(kl) * (labels != IGNORE)
    return (kl * w).sum() / w.sum().clamp(min=1e-8)


def first_error_weights(logits: torch.Tensor, labels: torch.Tensor, focal_lambda: float) -> torch.Tensor:
    """1 everywhere, 1 + lambda on each block's first scorable slot whose argmax is wrong.

    That slot ends the greedy accepted prefix. logits [B, nb, g-1, V], labels [B, nb, g-1]
    -> weights [B, nb, g-1] (no gradient: they come from an argmax).
    """
    wrong = (logits.detach().argmax(dim=-1) != labels) & (labels != IGNORE)  # [B, nb, g-1]
    first = wrong & (wrong.long().cumsum(dim=-1) == 1)
    return 1.0 + focal_lambda * first.float()


def true_token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p of each slot's label, 0 where IGNORE. [B, nb, g-1, V], [B, nb, g-1] -> [B, nb, g-1]."""
    logp = -F.cross_entropy(logits.flatten(0, 2).float(), labels.clamp(min=0).flatten(), reduction="none")
    return logp.view(labels.shape).masked_fill(labels == IGNORE, 0.0)


def chain_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean over blocks of -log E, E = sum_k prod_{j<=k} p_j the expected accepted length.

    p_j is the drafter's probability of the true token at slot j; an IGNORE slot ends the
    chain. Blocks without a scorable slot do not count. The gradient on log p_i is
    -(sum_{k>=i} prod_{j<=k} p_j) / E: early slots, which gate every later one, weigh most.
    """
    scorable = labels != IGNORE  # [B, nb, g-1]
    log_e = log_expected_accepted_length(true_token_log_probs(logits, labels), scorable)  # [B, nb]
    keep = scorable[..., 0]
    return -log_e[keep].mean() if keep.any() else logits.sum() * 0.0


def alignment_weights(num_positions: int, masked: torch.Tensor, alpha: float) -> torch.Tensor:
    """Stage-II weights: slot i of a block with R masked slots gets alpha^(R-i) if i <= R, else 0.

    masked: [...] values of R in 1..num_positions -> [..., num_positions]. With alpha > 1 the
    slot next to the known prefix (i = 1) weighs most.
    """
    i = torch.arange(1, num_positions + 1, device=masked.device, dtype=torch.float32)
    r = masked[..., None].float()
    return torch.where(i <= r, alpha ** (r - i), torch.zeros(()))


def acceptance_counts(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy acceptance of each block: accepted prefix length per block and how many slots were scorable.

    Returns (prefix_len [N], scorable [N]) over the N blocks with at least one label.
    """
    correct = (logits.argmax(dim=-1) == labels) & (labels != IGNORE)  # [B, nb, g-1]
    prefix = correct.int().cumprod(dim=-1).sum(dim=-1).flatten()  # [B*nb]
    scorable = (labels != IGNORE).sum(dim=-1).flatten()
    keep = scorable > 0
    return prefix[keep], scorable[keep]


def simulated_tau(prefix_lens: torch.Tensor) -> float:
    """1 + mean accepted prefix: what tau would be with these greedy acceptances (bonus included)."""
    return 1.0 + float(prefix_lens.float().mean()) if prefix_lens.numel() else math.nan


def per_position_acceptance(prefix_lens: torch.Tensor, scorable: torch.Tensor, num_positions: int) -> list[float]:
    """rate[k-1] = P(position k accepted | positions < k accepted and k scorable)."""
    rates = []
    for k in range(1, num_positions + 1):
        reached = (prefix_lens >= k - 1) & (scorable >= k)
        rates.append(float((prefix_lens[reached] >= k).float().mean()) if reached.any() else math.nan)
    return rates
