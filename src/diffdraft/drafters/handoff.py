"""Two drafters in turn: a warm-up drafter for the first tokens of a response, then the main one.

The standalone diffusion drafter reads no target features, so on the first tokens of a
response it has little to go on; the warm-up drafter (e.g. n-gram prompt lookup) drafts
until the response holds `warmup_tokens` tokens, then the main drafter takes over (a
warm-up drafter of None drafts nothing: plain decoding for those tokens). Both see every
begin/observe call (taps only if they want them), so either can take a turn at any time.
Knows nothing of what either drafter is.
"""

from __future__ import annotations

import torch

from diffdraft.config import SamplingConfig
from diffdraft.drafters.base import Draft, Drafter


class HandoffDrafter(Drafter):
    def __init__(self, warmup: Drafter | None, main: Drafter, warmup_tokens: int):
        self.warmup, self.main, self.warmup_tokens = warmup, main, warmup_tokens
        self.name = f"{main.name}+{warmup.name if warmup else 'none'}@{warmup_tokens}"
        self._both = [d for d in (warmup, main) if d is not None]
        self.wants_taps = any(d.wants_taps for d in self._both)
        self.states_q = all(d.states_q for d in self._both)
        self._prompt_len = 0

    def check_compatible(self, target) -> None:
        for drafter in self._both:
            drafter.check_compatible(target)

    def begin(self, prompt: list[int], taps: torch.Tensor | None) -> None:
        self._prompt_len = len(prompt)
        for drafter in self._both:
            drafter.begin(prompt, taps if drafter.wants_taps else None)

    def observe(self, taps: torch.Tensor | None) -> None:
        for drafter in self._both:
            drafter.observe(taps if drafter.wants_taps else None)

    def propose(self, tokens: list[int], num_tokens: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Draft:
        if len(tokens) - self._prompt_len >= self.warmup_tokens:
            return self.main.propose(tokens, num_tokens, sampling, generator)
        if self.warmup is None:
            return Draft.empty()
        return self.warmup.propose(tokens, num_tokens, sampling, generator)
