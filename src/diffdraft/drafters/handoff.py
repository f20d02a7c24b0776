"""Two drafters in turn: a warm-up drafter for the first tokens of a response, then the main one.

The standalone diffusion drafter reads no target features, so on the first tokens of a
response it has little to go on; the warm-up drafter (e.g. n-gram prompt lookup) drafts
until the response holds `warmup_tokens` tokens, then the main drafter takes over (a
warm-up drafter of None drafts nothing: plain decoding for those tokens). Both see every
begin/observe call (taps only if they want them), so either can take a turn at any time.
Its per-sequence state holds the prompt's length and both drafters' own states.
Knows nothing of what either drafter is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdraft.config import SamplingConfig
from diffdraft.drafters.base import Draft, Drafter


@dataclass
class HandoffState:
    prompt_len: int  # where the response starts
    states: list  # each drafter's own state, in the order of HandoffDrafter._both


class HandoffDrafter(Drafter):
    def __init__(self, warmup: Drafter | None, main: Drafter, warmup_tokens: int):
        self.warmup, self.main, self.warmup_tokens = warmup, main, warmup_tokens
        self.name = f"{main.name}+{warmup.name if warmup else 'none'}@{warmup_tokens}"
        self._both = [d for d in (warmup, main) if d is not None]
        self.wants_taps = any(d.wants_taps for d in self._both)
        self.states_q = all(d.states_q for d in self._both)

    def check_compatible(self, target) -> None:
        for drafter in self._both:
            drafter.check_compatible(target)

    def new_state(self) -> HandoffState:
        return HandoffState(prompt_len=0, states=[drafter.new_state() for drafter in self._both])

    def begin(self, state: HandoffState, prompt: list[int], taps: torch.Tensor | None) -> None:
        state.prompt_len = len(prompt)
        for drafter, own in zip(self._both, state.states):
            drafter.begin(own, prompt, taps if drafter.wants_taps else None)

    def observe(self, state: HandoffState, taps: torch.Tensor | None) -> None:
        for drafter, own in zip(self._both, state.states):
            drafter.observe(own, taps if drafter.wants_taps else None)

    def propose(self, state: HandoffState, tokens: list[int], num_tokens: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Draft:
        if len(tokens) - state.prompt_len >= self.warmup_tokens:
            return self.main.propose(state.states[-1], tokens, num_tokens, sampling, generator)
        if self.warmup is None:
            return Draft.empty()
        return self.warmup.propose(state.states[0], tokens, num_tokens, sampling, generator)
