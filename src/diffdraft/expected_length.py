"""Expected accepted length of a draft, from the probability of each drafted token.

If token k of a draft is accepted with probability p_k given that tokens < k were, the
expected number of accepted draft tokens is E = sum_k prod_{j<=k} p_k. This module
computes log E stably from log p (a cumulative sum, then logsumexp). Training uses it as
the chain loss (p = the drafter's probability of the true token); drafting uses it to pick
the most promising of several candidate blocks (p = the drafter's own probability of its
drafted token). Pure tensor code: knows nothing of models or verification.
"""

from __future__ import annotations

import torch


def log_expected_accepted_length(log_p: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """log E over the last dimension.

    log_p: [..., n] log-probability of each position's token; valid: [..., n] bool, False
    for positions that do not exist (they end the chain: a draft cannot accept past them).
    Returns [...]; -inf where no position is valid.
    """
    if valid is None:
        valid = torch.ones_like(log_p, dtype=torch.bool)
    alive = valid.long().cumprod(dim=-1).bool()  # positions before the first missing one
    log_prefix = torch.where(alive, log_p, torch.zeros_like(log_p)).cumsum(dim=-1)  # log prod_{j<=k} p_j
    log_prefix = log_prefix.masked_fill(~alive, float("-inf"))
    return torch.logsumexp(log_prefix, dim=-1)
