"""Per-block training losses over the g-1 masked positions, and acceptance metrics.

Position k = 1..g-1 is the k-th masked slot of a block (the first draft token is k = 1).
Knows nothing of models: inputs are logits and labels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from diffdraft.train.masks import IGNORE


def positional_weights(num_positions: int, gamma: float | None) -> torch.Tensor:
    """w_k = exp(-(k-1)/gamma) for k = 1..num_positions; gamma None gives uniform weights."""
    k = torch.arange(num_positions, dtype=torch.float32)
    return torch.ones(num_positions) if gamma is None else torch.exp(-k / gamma)


def weighted_block_loss(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean cross-entropy.

    logits: [B, nb, g-1, V]; labels: [B, nb, g-1] (IGNORE where absent); weights: [g-1].
    """
    nll = F.cross_entropy(logits.flatten(0, 2).float(), labels.flatten(), ignore_index=IGNORE, reduction="none")
    nll = nll.view(labels.shape)  # [B, nb, g-1]
    w = weights.to(nll.device)[None, None, :] * (labels != IGNORE)
    return (nll * w).sum() / w.sum().clamp(min=1e-8)


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
