"""Draft trees from one drafter pass (docs/design.md, 'Draft trees').

A drafter that states its best alternatives per slot (Draft.alternatives: for each slot its K
most likely tokens and their values, the calibrated probability that the slot accepts that
token once reached) offers more than a chain: any sequence of one alternative per slot,
slot after slot, is a candidate path. Its value, the probability of being reached and
accepted, is the product of its tokens' values. `best_first` grows the tree in falling order
of value (a node's value never exceeds its parent's, so the parents come first), and
`with_branch` merges another drafter's chain (the n-gram lookup's continuation) into the
tree, sharing prefixes. `best_size` keeps the prefix that maximizes expected tokens per second,
(1 + sum of values) / (d + c(1 + nodes)), by the measured cost curve: a flat curve grows
the tree, a steep one shrinks it to a chain or to nothing. The chain is the case K = 1.
Pure arithmetic on small tensors; knows nothing of models or verification.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch

from diffdraft.draft_length import CostCurve


@dataclass(frozen=True)
class DraftTree:
    tokens: tuple[int, ...]  # one per node, best first
    parents: tuple[int, ...]  # the parent node of each, -1 for a child of the root (the last committed token)
    values: tuple[float, ...]  # probability of being reached and accepted, falling

    def __len__(self) -> int:
        return len(self.tokens)

    def prefix(self, n: int) -> "DraftTree":
        """The first n nodes: still a tree, since parents come first."""
        return DraftTree(self.tokens[:n], self.parents[:n], self.values[:n])

    def rows(self) -> list[int]:
        """Parents for a forward over [root, nodes...]: row 0 follows the committed sequence."""
        return [-1] + [p + 1 for p in self.parents]


def best_first(tokens: torch.Tensor, values: torch.Tensor, limit: int) -> DraftTree:
    """Up to `limit` nodes in falling order of value. tokens, values: [g, K], each slot's alternatives
    best first (distinct tokens per slot)."""
    g, width = tokens.shape
    tok, val = tokens.tolist(), values.double().tolist()
    nodes_tokens, nodes_parents, nodes_values = [], [], []
    # heap of (-value, tiebreak, slot, choice, parent node); a popped node pushes its first child and next sibling
    heap = [(-val[0][0], 0, 0, 0, -1)] if g and width and limit > 0 else []
    count = 1
    while heap and len(nodes_tokens) < limit:
        negative, _, slot, choice, parent = heapq.heappop(heap)
        node = len(nodes_tokens)
        nodes_tokens.append(tok[slot][choice])
        nodes_parents.append(parent)
        nodes_values.append(-negative)
        base = nodes_values[parent] if parent >= 0 else 1.0
        if choice + 1 < width:  # the next alternative at this slot, under the same parent
            heapq.heappush(heap, (-base * val[slot][choice + 1], count, slot, choice + 1, parent))
            count += 1
        if slot + 1 < g:  # the best continuation of this node
            heapq.heappush(heap, (-nodes_values[node] * val[slot + 1][0], count, slot + 1, 0, node))
            count += 1
    return DraftTree(tuple(nodes_tokens), tuple(nodes_parents), tuple(nodes_values))


def best_size(tree: DraftTree, costs: CostCurve, asked: int) -> int:
    """How many of the tree's first nodes maximize expected tokens per second (0: verify none), after a drafter
    call asked for `asked` slots."""
    emitted = 1.0
    drafting = costs.draft(asked)  # spent
    best, best_rate = 0, 1.0 / (drafting + costs.target(1))
    for n, value in enumerate(tree.values, start=1):
        emitted += value
        rate = emitted / (drafting + costs.target(n + 1))
        if rate > best_rate:
            best, best_rate = n, rate
    return best


def top_chain(tree: DraftTree, tokens: torch.Tensor) -> list[int]:
    """The tree's nodes that form the chain of each slot's best token, by depth (tokens: [g, K], the
    alternatives it was grown from): the chain a length rule would have verified."""
    return branch_nodes(tree, tokens[:, 0].tolist())


def with_branch(tree: DraftTree, tokens: list[int], values: list[float]) -> DraftTree:
    """The tree with one more branch from the root (another drafter's chain: an n-gram lookup's
    continuation), sharing the nodes of any prefix the tree already holds (a shared node keeps the
    larger value). Nodes are put back in falling order of value, parents first."""
    nodes_tokens, nodes_parents, nodes_values = list(tree.tokens), list(tree.parents), list(tree.values)
    parent = -1
    for token, value in zip(tokens, values):
        node = _child(nodes_tokens, nodes_parents, parent, token)
        if node is None:
            node = len(nodes_tokens)
            nodes_tokens.append(token)
            nodes_parents.append(parent)
            nodes_values.append(value)
        else:
            nodes_values[node] = max(nodes_values[node], value)
        parent = node
    depth = []
    for p in nodes_parents:
        depth.append(0 if p == -1 else depth[p] + 1)
    # a node's value never exceeds its parent's, so falling value (then depth) keeps parents first
    order = sorted(range(len(nodes_tokens)), key=lambda i: (-nodes_values[i], depth[i], i))
    where = {old: new for new, old in enumerate(order)}
    return DraftTree(tuple(nodes_tokens[i] for i in order),
                     tuple(-1 if nodes_parents[i] == -1 else where[nodes_parents[i]] for i in order),
                     tuple(nodes_values[i] for i in order))


def followed(nodes: list[int], path: list[int]) -> int:
    """How far an accepted path (rows: 0 the root, then node + 1) ran along `nodes`, a chain of the tree's
    nodes from the root."""
    n = 0
    while n < min(len(nodes), len(path) - 1) and path[1 + n] - 1 == nodes[n]:
        n += 1
    return n


def branch_nodes(tree: DraftTree, tokens: list[int]) -> list[int]:
    """The tree's nodes holding the chain `tokens` from the root, as far as it holds them."""
    chain, parent = [], -1
    for token in tokens:
        node = _child(tree.tokens, tree.parents, parent, token)
        if node is None:
            break
        chain.append(node)
        parent = node
    return chain


def _child(tokens, parents, parent: int, token: int) -> int | None:
    """The node under `parent` (-1: the root) that holds `token`, if any (siblings hold distinct tokens)."""
    return next((i for i in range(len(tokens)) if parents[i] == parent and tokens[i] == token), None)
