"""Lossless verification of a drafted block. Pure: no models, no state.

Inputs are the g drafted tokens, the target's distributions p at the g + 1 positions
(row i is the law of the token after the context plus the first i draft tokens; row g gives
the bonus token), for rejection sampling the drafter's distributions q the tokens were
drawn from, and a torch.Generator. The result is the accepted prefix of the draft followed
by exactly one token of the target's own: the *recovered* token after a rejection, or the
*bonus* token when every draft token was accepted.

- greedy: accept while the draft equals the target's argmax (temperature 0).
- rejection: accept x_i with probability min(1, p_i(x_i) / q_i(x_i)); on the first rejection
  draw from norm(max(0, p_i - q_i)). Lossless when q_i is the exact law of x_i given the
  earlier draft tokens.
- point-mass: draw y_i from p_i and accept while y_i == x_i. Lossless for any drafter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdraft.sampling import sample


@dataclass(frozen=True)
class Verdict:
    """What verification decided for one block."""

    num_accepted: int  # draft tokens accepted, 0..draft_len
    tokens: list[int]  # the accepted draft tokens, then one recovered or bonus token
    draft_len: int  # g, how many tokens were drafted

    @property
    def bonus(self) -> bool:
        """True when the whole draft was accepted, so the last token is the bonus token."""
        return self.num_accepted == self.draft_len


def _check_shapes(draft_tokens: torch.Tensor, target_probs: torch.Tensor) -> int:
    g = draft_tokens.shape[0]
    if draft_tokens.dim() != 1 or target_probs.dim() != 2 or target_probs.shape[0] != g + 1:
        raise ValueError(
            f"expected draft_tokens [g] and target rows [g+1, V], got {tuple(draft_tokens.shape)} "
            f"and {tuple(target_probs.shape)}"
        )
    return g


def _verdict(draft_tokens: torch.Tensor, num_accepted: int, last_token: int) -> Verdict:
    g = draft_tokens.shape[0]
    accepted = draft_tokens[:num_accepted].tolist()
    return Verdict(num_accepted=num_accepted, tokens=accepted + [int(last_token)], draft_len=g)


def verify_greedy(draft_tokens: torch.Tensor, target_scores: torch.Tensor) -> Verdict:
    """Greedy matching. draft_tokens: [g] int64; target_scores: [g+1, V] logits or probs."""
    g = _check_shapes(draft_tokens, target_scores)
    best = target_scores.argmax(dim=-1)  # [g+1]
    matches = (best[:g] == draft_tokens).int()  # [g]
    num_accepted = int(matches.cumprod(dim=0).sum()) if g else 0
    return _verdict(draft_tokens, num_accepted, int(best[num_accepted]))


def verify_rejection(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Speculative rejection sampling.

    draft_tokens: [g] int64; draft_probs: [g, V] float32 (the q each token was drawn from);
    target_probs: [g+1, V] float32.
    """
    g = _check_shapes(draft_tokens, target_probs)
    if draft_probs.shape != (g, target_probs.shape[1]):
        raise ValueError(f"draft_probs must be [g, V] = {(g, target_probs.shape[1])}, got {tuple(draft_probs.shape)}")
    rows = torch.arange(g)
    p_x = target_probs[rows, draft_tokens]  # [g]
    q_x = draft_probs[rows, draft_tokens]  # [g]
    if bool((q_x <= 0).any()):
        raise ValueError("a draft token has probability 0 under its own q: q is not the law it was drawn from")
    uniforms = torch.rand(g, generator=generator)  # [g]
    rejected = uniforms >= (p_x / q_x)  # accept with probability min(1, p/q)
    if not bool(rejected.any()):
        return _verdict(draft_tokens, g, int(sample(target_probs[g], generator)))
    i = int(rejected.int().argmax())  # first rejection
    residual = (target_probs[i] - draft_probs[i]).clamp(min=0)  # [V]
    mass = residual.sum()
    # mass is 0 only when p_i == q_i, where a rejection has probability 0; keep p_i then.
    recovered_law = residual / mass if float(mass) > 0 else target_probs[i]
    return _verdict(draft_tokens, i, int(sample(recovered_law, generator)))


def verify_point_mass(
    draft_tokens: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> Verdict:
    """Point-mass matching: draw y_i ~ p_i, accept while y_i == x_i.

    draft_tokens: [g] int64; target_probs: [g+1, V] float32.
    """
    g = _check_shapes(draft_tokens, target_probs)
    drawn = sample(target_probs, generator)  # [g+1]; row i only matters if rows < i matched
    matches = (drawn[:g] == draft_tokens).int()  # [g]
    num_accepted = int(matches.cumprod(dim=0).sum()) if g else 0
    return _verdict(draft_tokens, num_accepted, int(drawn[num_accepted]))
