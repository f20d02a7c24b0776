"""The drafter interface: propose the next g tokens of a sequence.

A drafter sees the whole token sequence so far (prompt + generated) and returns up to g
proposed tokens. If it can state the exact law q_i of each proposed token given the
earlier proposed ones, it returns those distributions too (then rejection sampling can
verify it); otherwise it returns None and verification falls back to point-mass matching.
Drafters that read the target's hidden states set `wants_taps` and receive the taps of
every token the target has committed through begin() and observe().
A drafter holds its loaded weights only; what it keeps about one sequence (a context cache,
the prompt's length) lives in the state new_state() makes, which the caller keeps per request
and hands to begin(), observe() and propose(). Drafters that keep nothing return None.
A drafter never sees the verifier's randomness except through the generator it is handed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from diffdraft.config import SamplingConfig


@dataclass
class Draft:
    tokens: torch.Tensor  # [g] int64, g may be smaller than asked (even 0)
    probs: torch.Tensor | None  # [g, V] float32: q_i, the exact law of tokens[i]; None if unknown
    # [g] float32, if the drafter has it: its own (unsharpened) top probability at slot i, how sure
    # it is there. A function of slot i's distribution only, never of the token drawn at i, so the
    # engine may cut the draft where the product falls below DraftConfig.min_confidence and each
    # kept token still follows its q (the cut is decided before the token is drawn).
    confidence: torch.Tensor | None = None
    # If the drafter has them: each slot's best tokens, best first, and the drafter's own (unsharpened)
    # probability of each, ([g, K] int64 target ids, [g, K] float32); draft_tree.py grows trees from them.
    alternatives: tuple[torch.Tensor, torch.Tensor] | None = None

    def truncated(self, n: int) -> "Draft":
        """The first n tokens (with their q, confidence and alternatives)."""
        return Draft(tokens=self.tokens[:n], probs=None if self.probs is None else self.probs[:n],
                     confidence=None if self.confidence is None else self.confidence[:n],
                     alternatives=None if self.alternatives is None else tuple(a[:n] for a in self.alternatives))

    @staticmethod
    def empty() -> "Draft":
        return Draft(tokens=torch.zeros(0, dtype=torch.long), probs=None)


class Drafter(ABC):
    """Base class for every drafter."""

    name: str = "drafter"
    wants_taps: bool = False  # True: begin()/observe() receive the target's tapped hidden states
    states_q: bool = False  # True: every Draft carries q, the exact law of its tokens (rejection sampling can verify it)

    def check_compatible(self, target) -> None:
        """Raise DiffdraftError if this drafter cannot draft for `target`."""

    def cost_id(self) -> str:
        """What sets this drafter's cost per call, for the cache of measured costs (diffdraft.costs)."""
        net = getattr(self, "net", None)
        size = sum(p.numel() for p in net.parameters()) if net is not None else 0
        return f"{type(self).__name__}:{self.name}:{size}"

    def new_state(self) -> Any:
        """What this drafter keeps about one sequence, fresh (None for a drafter that keeps nothing)."""
        return None

    def begin(self, state: Any, prompt: list[int], taps: torch.Tensor | None) -> None:
        """A new sequence starts. taps: [1, len(prompt), n_taps*D] when wants_taps."""

    def observe(self, state: Any, taps: torch.Tensor | None) -> None:
        """The target committed more tokens. taps: [1, n, n_taps*D] for those tokens, in order."""

    @abstractmethod
    def propose(
        self, state: Any, tokens: list[int], num_tokens: int, sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        """Propose up to num_tokens tokens that continue `tokens`."""
