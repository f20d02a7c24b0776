"""Prompt-lookup (n-gram) drafter: copy what followed the last occurrence of the current suffix.

No model and no probabilities: its proposals are deterministic, and verification uses greedy
matching or point-mass matching. Strong where answers repeat the prompt (code edits,
summaries, quotes), weak elsewhere. Knows nothing of the target beyond token ids.
"""

from __future__ import annotations

import torch

from diffdraft.config import SamplingConfig
from diffdraft.drafters.base import Draft, Drafter
from diffdraft.errors import DiffdraftError


MAX_NGRAM = 3  # the longest suffix looked up by default


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, max_ngram: int = MAX_NGRAM, min_ngram: int = 1):
        if not 1 <= min_ngram <= max_ngram:
            raise DiffdraftError(f"n-gram sizes must satisfy 1 <= min <= max, got min={min_ngram}, max={max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(
        self, state: None, tokens: list[int], num_tokens: int, sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        continuation = lookup_continuation(tokens, num_tokens, self.max_ngram, self.min_ngram)
        return Draft(tokens=torch.tensor(continuation, dtype=torch.long), probs=None)


def lookup_continuation(tokens: list[int], num_tokens: int, max_ngram: int, min_ngram: int) -> list[int]:
    """The up to num_tokens tokens that followed the latest earlier match of the longest suffix n-gram."""
    length = len(tokens)
    for n in range(min(max_ngram, length - 1), min_ngram - 1, -1):
        suffix = tokens[length - n :]
        # latest start j < length - n with tokens[j:j+n] == suffix
        for j in range(length - n - 1, -1, -1):
            if tokens[j : j + n] == suffix:
                return tokens[j + n : j + n + num_tokens]
    return []
