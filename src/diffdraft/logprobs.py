"""The target's log probability of each emitted token, with its best alternatives (OpenAI's
`logprobs` / `top_logprobs`).

Made from the very logits rows that decided the tokens (the prefill's last row for the first
token, a verify forward's rows for the rest), so they are the target's own numbers, not a
drafter's: on the row-invariant lean runtime a speculative answer reports bit for bit what
plain decoding reports. How a row becomes log probabilities is sampling.logits_to_logprobs.
Knows nothing of drafters, text or HTTP.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffdraft.config import SamplingConfig
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_logprobs

MAX_TOP_LOGPROBS = 20  # OpenAI's limit for top_logprobs


@dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # finite: the token was drawn from (or is the argmax of) this law
    top: tuple[tuple[int, float], ...]  # up to `top` best (token, logprob), best first, excluded tokens left out


def check_top(top: int | None) -> None:
    """None (no log probabilities) or how many alternatives per token, 0..MAX_TOP_LOGPROBS."""
    if top is None:
        return
    if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS:
        raise DiffdraftError(f"top logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {top!r}")


def token_logprobs(logits: torch.Tensor, tokens: list[int], sampling: SamplingConfig, top: int) -> list[TokenLogprob]:
    """logits: [n, V], row i the target's logits for tokens[i] (n == len(tokens))."""
    if logits.dim() != 2 or logits.shape[0] != len(tokens):
        raise ValueError(f"expected logits [{len(tokens)}, V], got {tuple(logits.shape)}")
    logprobs = logits_to_logprobs(logits, sampling)  # [n, V]
    chosen = logprobs[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)].tolist()  # [n]
    if top > 0:
        values, ids = logprobs.topk(top, dim=-1)  # [n, top]
        best = [tuple((i, v) for i, v in zip(row_ids, row_values) if v != -math.inf)
                for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    else:
        best = [()] * len(tokens)
    return [TokenLogprob(token=t, logprob=lp, top=b) for t, lp, b in zip(tokens, chosen, best)]
