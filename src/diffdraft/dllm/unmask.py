"""Confidence-ordered unmasking: which slots one denoising step reveals, and with what tokens.

One rule, used by the target's own decoding, by the dLLM drafter and by SimSD's
verifier, so that "the target's decision at this state" means the same thing everywhere:

- a block of b slots is decoded in `steps` steps; step j reveals schedule(b, steps)[j]
  slots (b // steps each, the first b % steps steps one more);
- greedy: every masked slot proposes its argmax token with confidence softmax(logits) of
  that token (temperature 1, float32); the `count` most confident slots are revealed,
  ties going to the lower slot;
- sampled: every masked slot draws a token from sampling.logits_to_probs (temperature,
  top-k, top-p); its confidence is the probability of the drawn token under that law; the
  `count` most confident slots are revealed, ties to the lower slot.

For count = 1 the law of the decision (slot, token) is computed exactly (step_law): slot p
with token x wins when every masked slot before p has confidence < p_p(x) and every one
after p has confidence <= p_p(x). That law is what rejection sampling needs.
Pure: logits and a generator in, decisions out; knows no model and no cache.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdraft.config import SamplingConfig
from diffdraft.dllm.model import MASK_ID
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_probs, sample


@dataclass(frozen=True)
class Step:
    """One denoising step's decision: slots (ascending) and the token revealed at each."""

    slots: tuple[int, ...]
    tokens: tuple[int, ...]

    def apply(self, block_ids: list[int]) -> list[int]:
        """The block after this step. block_ids: [b], MASK_ID where masked."""
        out = list(block_ids)
        for slot, token in zip(self.slots, self.tokens):
            if out[slot] != MASK_ID:
                raise ValueError(f"slot {slot} is revealed already")
            out[slot] = token
        return out

    def flat(self, vocab_size: int) -> int:
        """A one-slot step as one index into [b * V] (slot-major)."""
        (slot,), (token,) = self.slots, self.tokens
        return slot * vocab_size + token

    @staticmethod
    def from_flat(index: int, vocab_size: int) -> "Step":
        return Step(slots=(index // vocab_size,), tokens=(index % vocab_size,))


def schedule(block_size: int, steps: int) -> list[int]:
    """Slots revealed at each step of a block: sums to block_size, front-loaded remainder."""
    if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= block_size:
        raise DiffdraftError(f"steps per block must be an integer in 1..{block_size}, got {steps!r}")
    base, extra = divmod(block_size, steps)
    return [base + (1 if j < extra else 0) for j in range(steps)]


def masked_slots(block_ids: list[int]) -> torch.Tensor:
    """[b] bool, True where the slot still holds MASK."""
    return torch.tensor([t == MASK_ID for t in block_ids], dtype=torch.bool)


def _top(confidence: torch.Tensor, masked: torch.Tensor, count: int) -> list[int]:
    """The `count` most confident masked slots, ties to the lower slot, returned ascending."""
    candidates = [int(p) for p in torch.nonzero(masked).flatten()]
    if count > len(candidates):
        raise ValueError(f"cannot reveal {count} slots: only {len(candidates)} are masked")
    values = confidence.tolist()
    return sorted(sorted(candidates, key=lambda p: (-values[p], p))[:count])


def choose_step(
    logits: torch.Tensor,  # [b, V] the model's logits at every slot of the block
    masked: torch.Tensor,  # [b] bool
    count: int,
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> Step:
    """Run the unmasking rule once (see the module docstring)."""
    logits = logits.float()
    if sampling.greedy:
        confidence, tokens = logits.softmax(dim=-1).max(dim=-1)  # [b], [b]
    else:
        probs = logits_to_probs(logits[masked], sampling)  # [m, V]
        drawn = sample(probs, generator)  # [m]
        tokens = torch.zeros(masked.shape[0], dtype=torch.long)
        confidence = torch.zeros(masked.shape[0])
        tokens[masked] = drawn.cpu()
        confidence[masked] = probs.gather(1, drawn[:, None])[:, 0].cpu()
    slots = _top(confidence.cpu(), masked, count)
    return Step(slots=tuple(slots), tokens=tuple(int(tokens[p]) for p in slots))


def step_law(logits: torch.Tensor, masked: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Exact law of a one-slot step over (slot, token). logits [b, V], masked [b] -> [b * V] float32.

    Greedy: one-hot on the greedy decision. Sampled: see the module docstring.
    """
    b, vocab = logits.shape
    if sampling.greedy:
        law = torch.zeros(b * vocab)
        law[choose_step(logits, masked, 1, sampling, None).flat(vocab)] = 1.0
        return law
    probs = torch.zeros(b, vocab, dtype=torch.float64)
    probs[masked] = logits_to_probs(logits[masked].float(), sampling).double().cpu()  # float32 values, exactly
    ordered, _ = probs.sort(dim=-1)  # [b, V] ascending
    below = torch.cat([torch.zeros(b, 1, dtype=torch.float64), ordered.cumsum(dim=-1)], dim=-1)  # [b, V+1]
    law = torch.zeros(b, vocab, dtype=torch.float64)
    slots = [int(p) for p in torch.nonzero(masked).flatten()]
    for p in slots:
        c = probs[p]  # [V] confidence of each token at slot p
        win = c.clone()
        for other in slots:
            if other == p:
                continue
            # P(conf_other < c) for an earlier slot (it wins ties), P(conf_other <= c) for a later one
            index = torch.searchsorted(ordered[other], c, right=other > p)  # [V]
            win *= below[other].gather(0, index)
        law[p] = win
    return law.flatten().float()
