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
    uniforms: torch.Tensor | None = None,
) -> Verdict:
    """Point-mass matching: draw y_i ~ p_i, accept while y_i == x_i.

    draft_tokens: [g] int64; target_probs: [g+1, V] float32; uniforms: [g+1] float64, the draws'
    uniforms instead of the generator's (sampling.position_uniforms: same seed, same tokens).
    """
    g = _check_shapes(draft_tokens, target_probs)
    drawn = sample(target_probs, generator, uniforms)  # [g+1]; row i only matters if rows < i matched
    matches = (drawn[:g] == draft_tokens).int()  # [g]
    num_accepted = int(matches.cumprod(dim=0).sum()) if g else 0
    return _verdict(draft_tokens, num_accepted, int(drawn[num_accepted]))


# ----- draft trees -----
@dataclass(frozen=True)
class TreeVerdict(Verdict):
    """What verification decided for a draft tree: `path` holds the rows kept, row 0 (the last committed
    token, the tree's root) first, then one per accepted draft token."""

    path: tuple[int, ...] = (0,)


def _walk_tree(tokens: torch.Tensor, parents: list[int], pick) -> TreeVerdict:
    """From the root (row 0), the target picks a token at each row reached (pick(row) -> token id); the
    walk moves to the child holding that token and stops where no child does: that pick is the
    target's own token. tokens: [k] int64 (row 0's is the root's, never verified); parents: [k]."""
    k = tokens.shape[0]
    if tokens.dim() != 1 or len(parents) != k or k == 0 or parents[0] != -1:
        raise ValueError(f"expected tokens [k] and parents [k] with row 0 the root, got {tuple(tokens.shape)} "
                         f"and {len(parents)} parents")
    children: dict[int, dict[int, int]] = {}
    values = tokens.tolist()
    for row in range(1, k):
        if not 0 <= parents[row] < row:
            raise ValueError(f"row {row}'s parent must be an earlier row, got {parents[row]}")
        siblings = children.setdefault(parents[row], {})
        if values[row] in siblings:
            raise ValueError(f"rows {siblings[values[row]]} and {row} are siblings with the same token")
        siblings[values[row]] = row
    path = [0]
    while True:
        token = pick(path[-1])
        child = children.get(path[-1], {}).get(token)
        if child is None:
            accepted = [values[r] for r in path[1:]]
            return TreeVerdict(num_accepted=len(accepted), tokens=accepted + [token], draft_len=k - 1,
                               path=tuple(path))
        path.append(child)


def verify_tree_greedy(tokens: torch.Tensor, parents: list[int], target_scores: torch.Tensor) -> TreeVerdict:
    """Greedy matching down a tree: follow the child that is the target's argmax. target_scores: [k, V]."""
    best = target_scores.argmax(dim=-1).tolist()  # [k]
    return _walk_tree(tokens, parents, lambda row: best[row])


def verify_tree_point_mass(tokens: torch.Tensor, parents: list[int], target_probs: torch.Tensor,
                           generator: torch.Generator | None, uniforms: torch.Tensor | None = None) -> TreeVerdict:
    """Point-mass matching down a tree: at each row reached draw y ~ p_row and follow the child holding y.
    Lossless for any tree: each emitted token is a draw from the target's law given the tokens before it.
    target_probs: [k, V] float32; uniforms: [tree depth + 1] float64, one per depth (the root's first)
    instead of the generator's: every row at one depth, one answer position, draws with the same one."""
    depth = [0] * len(parents)
    for row in range(1, len(parents)):
        depth[row] = depth[parents[row]] + 1 if 0 <= parents[row] < row else 0

    def pick(row: int) -> int:
        u = None if uniforms is None else uniforms[depth[row] : depth[row] + 1]
        return int(sample(target_probs[row], generator, u))

    return _walk_tree(tokens, parents, pick)
