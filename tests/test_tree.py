"""Draft trees: tree verification against exact laws, and the tree builder and its budget.

The law check reuses test_verify's tables (a target p(x | last two tokens) and a drafter
q(x | last token) over V = 5 tokens) and lawcheck's chi-square: a pure loop builds a tree
from q's best alternatives, verifies it against p's rows along each node's path, and repeats
until L = 3 tokens are out. Point-mass verification emits only the target's own draws, so its
law is the target's for any tree, even one built after peeking at p (shown). Deliberately wrong
tree verifiers (rows read one level off; a child kept when p favours it without a draw) go
through the same check and must be caught.
"""

from __future__ import annotations

import pytest
import torch

from diffdraft.draft_length import CostCurve
from diffdraft.draft_tree import DraftTree, best_first, best_size, top_chain
from diffdraft.sampling import sample
from diffdraft.verify import TreeVerdict, verify_greedy, verify_tree_greedy, verify_tree_point_mass
from lawcheck import fit
from test_verify import L, N, SHAPES, V, Tables


def tree_from_q(tables: Tables, context: list[int], width: int, depth: int, peek: bool = False) -> DraftTree:
    """Best-first nodes from q's top `width` tokens at the last token, the same at every slot (any tree
    will do for point-mass); peek: the first node is the target's own argmax at this step."""
    q = tables.q[([V] + context)[-1]]  # [V]
    values, tokens = q.topk(width)
    if peek:
        best = int(tables.p_row(context).argmax())
        tokens = torch.tensor([best] + [t for t in tokens.tolist() if t != best][: width - 1])
        values = q[tokens]
    return best_first(tokens.expand(depth, -1), values.expand(depth, -1), limit=width * depth)


def row_probs(tables: Tables, context: list[int], tree: DraftTree, shift: bool = False) -> torch.Tensor:
    """p at each row of [root, nodes...] given the path to it: [1 + nodes, V]. shift: a node's row
    holds its parent's p (the off-by-one bug)."""
    rows = tree.rows()
    paths = [[]]
    for i in range(1, len(rows)):
        paths.append(paths[rows[i]] + [tree.tokens[i - 1]])
    probs = [tables.p_row(context + path) for path in paths]
    if shift:
        probs = [probs[0]] + [probs[rows[i]] for i in range(1, len(rows))]
    return torch.stack(probs)


def lenient_verify(tokens, parents, probs, gen) -> TreeVerdict:
    """Wrong: keeps the child whose token p favours most when that p exceeds 0.3, without a draw."""
    path = [0]
    while True:
        kids = [r for r in range(1, len(parents)) if parents[r] == path[-1]]
        best = max(kids, key=lambda r: float(probs[path[-1], tokens[r]]), default=None)
        if best is not None and float(probs[path[-1], tokens[best]]) > 0.3:
            path.append(best)
            continue
        y = int(sample(probs[path[-1]], gen))
        accepted = [int(tokens[r]) for r in path[1:]]
        return TreeVerdict(num_accepted=len(accepted), tokens=accepted + [y], draft_len=len(parents) - 1,
                           path=tuple(path))


def tree_samples(tables: Tables, verifier, n: int, seed: int, peek: bool = False, shift: bool = False):
    gen = torch.Generator().manual_seed(seed)
    out, accepted = [], 0
    for _ in range(n):
        context: list[int] = []
        while len(context) < L:
            tree = tree_from_q(tables, context, width=2, depth=2, peek=peek)
            tokens = torch.tensor([context[-1] if context else 0, *tree.tokens])
            verdict = verifier(tokens, tree.rows(), row_probs(tables, context, tree, shift), gen)
            accepted += verdict.num_accepted
            context += verdict.tokens
        out.append(tuple(context[:L]))
    return out, accepted


@pytest.mark.parametrize("shape, peek", [(shape, False) for shape in SHAPES] + [("t1", True)])
def test_tree_point_mass_law_equals_the_target_law(shape, peek):
    tables = Tables(SHAPES[shape], seed=3)
    samples, accepted = tree_samples(tables, verify_tree_point_mass, N, seed=11, peek=peek)
    result = fit(samples, tables.exact_law())
    assert result.ok, str(result)
    assert accepted > N // 4  # the trees were used, not just the target's own draws


@pytest.mark.parametrize("wrong", ["shifted rows", "lenient"])
def test_wrong_tree_verifiers_are_detected(wrong):
    tables = Tables(SHAPES["t1"], seed=3)
    if wrong == "shifted rows":
        samples, _ = tree_samples(tables, verify_tree_point_mass, N, seed=11, shift=True)
    else:
        samples, _ = tree_samples(tables, lenient_verify, N, seed=11)
    assert not fit(samples, tables.exact_law()).ok


def test_tree_greedy_on_a_chain_is_chain_greedy():
    gen = torch.Generator().manual_seed(0)
    for trial in range(200):
        g = trial % 6
        scores = torch.randn(g + 1, 7, generator=gen)
        draft = scores.argmax(-1)[:g].clone()
        if g and trial % 3 == 0:
            draft[trial % g] = (draft[trial % g] + 1) % 7
        chain = verify_greedy(draft, scores)
        tree = verify_tree_greedy(torch.cat([torch.tensor([0]), draft]), [-1] + list(range(g)), scores)
        assert (tree.tokens, tree.num_accepted) == (chain.tokens, chain.num_accepted)
        assert tree.path == tuple(range(chain.num_accepted + 1))


def test_tree_greedy_follows_the_argmax_branch():
    #          root(0)
    #         /      \
    #     a=1(1)    b=2(2)
    #       |         |
    #     c=3(3)    d=4(4)
    tokens, parents = torch.tensor([0, 1, 2, 3, 4]), [-1, 0, 0, 1, 2]
    scores = torch.full((5, 6), -1.0)
    scores[0, 2] = scores[2, 4] = scores[4, 5] = 1.0  # the target says b, then d, then 5
    verdict = verify_tree_greedy(tokens, parents, scores)
    assert verdict.tokens == [2, 4, 5] and verdict.path == (0, 2, 4) and verdict.num_accepted == 2
    with pytest.raises(ValueError, match="siblings with the same token"):
        verify_tree_greedy(torch.tensor([0, 1, 1]), [-1, 0, 0], scores[:3])


def test_best_first_grows_in_falling_value_with_parents_first():
    tokens = torch.tensor([[10, 11], [20, 21], [30, 31]])
    values = torch.tensor([[0.8, 0.15], [0.6, 0.3], [0.9, 0.05]])
    tree = best_first(tokens, values, limit=6)
    assert list(tree.values) == sorted(tree.values, reverse=True)
    assert tree.tokens[:3] == (10, 20, 30)  # the chain of best tokens leads
    assert all(p < i for i, p in enumerate(tree.parents))
    assert tree.values[1] == pytest.approx(0.48) and tree.values[2] == pytest.approx(0.432)
    assert tree.values[3] == pytest.approx(0.8 * 0.3) and tree.tokens[3] == 21 and tree.parents[3] == 0
    chain = best_first(tokens[:, :1], values[:, :1], limit=10)
    assert chain.parents == (-1, 0, 1)  # width 1 is a chain
    assert top_chain(tree, tokens) == [0, 1, 2] and top_chain(tree.prefix(2), tokens) == [0, 1]
    wide = best_first(tokens, torch.tensor([[0.5, 0.45], [0.5, 0.3], [0.9, 0.05]]), limit=6)
    chain = top_chain(wide, tokens)  # an alternative (node 1) came before the chain's second node
    assert wide.tokens[1] == 11 and chain[:2] == [0, 2] and len(chain) == 3
    assert [wide.tokens[n] for n in chain] == [10, 20, 30] and wide.parents[chain[2]] == 2


def test_the_budget_follows_the_cost_curve():
    tree = best_first(torch.arange(12).view(3, 4), torch.tensor([[0.6, 0.3, 0.05, 0.05]] * 3), limit=20)
    flat = CostCurve(target_s=tuple(0.010 + 0.0001 * k for k in range(32)), draft_s=0.002)
    steep = CostCurve(target_s=tuple(0.010 * (1 + k) for k in range(32)), draft_s=0.002)
    middle = CostCurve(target_s=tuple(0.010 + 0.002 * k for k in range(32)), draft_s=0.002)
    assert best_size(tree, flat, 3) > 6  # a flat curve grows a wide tree
    assert best_size(tree, steep, 3) == 0  # each row costs a whole forward: verify nothing
    assert 1 <= best_size(tree, middle, 3) < best_size(tree, flat, 3)


# --------------------------------------------------------------------------- through the engine
from diffdraft.config import DraftConfig, SamplingConfig  # noqa: E402
from diffdraft.draft_length import LengthPolicy  # noqa: E402
from diffdraft.drafters import Draft, Drafter  # noqa: E402
from diffdraft.engine import SpeculativeEngine  # noqa: E402
from test_engine import LAW_PROMPT, N_ENGINE, PROMPTS, encode, engine_samples, exact_law, plain  # noqa: E402

WIDTH = 3


class HiddenAnswerDrafter(Drafter):
    """Knows the greedy answer but ranks it first only now and then: at slot i of call c the right token
    is alternative (c + i) % WIDTH, so a chain accepts little and a tree more."""

    name = "hidden-answer"

    def __init__(self, reference: list[int], vocab_size: int):
        self.reference, self.vocab_size, self.calls = reference, vocab_size, 0

    def propose(self, state, tokens, num_tokens, sampling, generator) -> Draft:
        right = self.reference[len(tokens) : len(tokens) + num_tokens]
        rows = []
        for i, token in enumerate(right):
            wrong = [(token + 1 + j) % self.vocab_size for j in range(WIDTH - 1)]
            place = (self.calls + i) % WIDTH
            rows.append(wrong[:place] + [token] + wrong[place:])
        self.calls += 1
        alternatives = torch.tensor(rows, dtype=torch.long).view(len(rows), WIDTH)  # [g, K]
        probs = torch.tensor([[0.5, 0.3, 0.2]]).expand(len(rows), WIDTH).contiguous()
        return Draft(tokens=alternatives[:, 0].clone(), probs=None, confidence=probs[:, 0].clone(),
                     alternatives=(alternatives, probs))


@pytest.mark.parametrize("tree", [0, 1, 3, 8, 20])
def test_greedy_tree_decoding_equals_plain_decoding(tiny_target, tree):
    target = tiny_target
    for text in PROMPTS:
        prompt = encode(target, text)
        reference = plain(target, prompt).tokens
        drafter = HiddenAnswerDrafter(prompt + reference, target.vocab_size)
        engine = SpeculativeEngine(target, drafter, DraftConfig(draft_len=4, length="fixed", tree=tree))
        result = engine.generate(prompt, max_new_tokens=len(reference))
        assert result.tokens == reference, f"tree {tree} on {text!r}"
        assert max(result.stats.proposed) == (tree or 4)


def test_a_tree_accepts_more_than_the_chain_of_the_same_drafter(tiny_target):
    prompt = encode(tiny_target, PROMPTS[0])
    reference = plain(tiny_target, prompt).tokens
    tau = {}
    for tree in (0, 20):
        engine = SpeculativeEngine(tiny_target, HiddenAnswerDrafter(prompt + reference, tiny_target.vocab_size),
                                   DraftConfig(draft_len=4, length="fixed", tree=tree))
        tau[tree] = engine.generate(prompt, max_new_tokens=len(reference)).stats.tau
    assert tau[20] > 1.5 * tau[0], tau


def test_the_length_rule_sizes_the_tree_by_the_cost_curve(tiny_target):
    """A flat cost curve grows trees past the chain, a steeper one smaller trees, and one where each row
    costs more than a whole forward verifies nothing (plain steps)."""
    prompt = encode(tiny_target, PROMPTS[1])
    reference = plain(tiny_target, prompt).tokens
    sizes = {}
    for name, curve in (("flat", CostCurve(tuple(0.01 + 0.0001 * k for k in range(32)), 0.001)),
                        ("medium", CostCurve(tuple(0.01 + 0.003 * k for k in range(32)), 0.001)),
                        ("steep", CostCurve(tuple(0.01 * (1 + k) ** 2 for k in range(32)), 0.001))):
        engine = SpeculativeEngine(tiny_target, HiddenAnswerDrafter(prompt + reference, tiny_target.vocab_size),
                                   DraftConfig(draft_len=4, tree=20), policy=LengthPolicy(curve))
        result = engine.generate(prompt, max_new_tokens=len(reference))
        assert result.tokens == reference
        sizes[name] = max(result.stats.proposed)
    assert sizes["flat"] > sizes["medium"] > sizes["steep"] == 0, sizes


class FixedTreeDrafter(Drafter):
    """Two alternatives per slot, fixed by the last token: (last + 1) % 4 and (last + 2) % 4."""

    name = "fixed-tree"

    def propose(self, state, tokens, num_tokens, sampling, generator) -> Draft:
        last = tokens[-1]
        alternatives = torch.tensor([[(last + 1) % 4, (last + 2) % 4]] * num_tokens, dtype=torch.long)
        probs = torch.tensor([[0.6, 0.4]] * num_tokens)
        return Draft(tokens=alternatives[:, 0].clone(), probs=None, confidence=probs[:, 0].clone(),
                     alternatives=(alternatives, probs))


def test_engine_tree_sampling_law_equals_the_target_law(small_target_for_trees):
    """Point-mass tree verification through the engine at T = 1, top-k 3: the first 3 tokens follow the
    target's exact law (chi-square, as test_engine's chain cases)."""
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    engine = SpeculativeEngine(small_target_for_trees, FixedTreeDrafter(),
                               DraftConfig(2, "point-mass", length="fixed", tree=4), sampling)
    samples, accepted = engine_samples(engine, N_ENGINE)
    result = fit(samples, exact_law(small_target_for_trees, LAW_PROMPT, sampling))
    assert result.ok, str(result)
    assert max(accepted) == 2  # whole paths of the tree were accepted


@pytest.fixture(scope="module")
def small_target_for_trees():
    from test_engine import make_small_target

    return make_small_target()


# ------------------------------------------------------------------------- same seed, same tokens
from diffdraft.drafters import NgramDrafter  # noqa: E402
from diffdraft.sampling import position_uniforms  # noqa: E402


def test_position_uniforms_are_keyed_by_seed_and_position_only():
    a = position_uniforms(7, 0, 2000)
    assert torch.equal(a[10:20], position_uniforms(7, 10, 10))  # the same whatever came first
    assert not torch.equal(a[:50], position_uniforms(8, 0, 50))
    assert bool(((a >= 0) & (a < 1)).all()) and abs(float(a.mean()) - 0.5) < 0.03
    assert len(set(a.tolist())) == 2000


@pytest.mark.parametrize("sampling", [SamplingConfig(temperature=1.0), SamplingConfig(temperature=0.7, top_p=0.9)])
@pytest.mark.parametrize("tree", [0, 8])
def test_seeded_point_mass_decoding_emits_exactly_seeded_plain_decoding(tiny_target, sampling, tree):
    """At T > 0 with point-mass verification (chain or tree) a seed gives plain decoding's very tokens,
    whatever the engine answered before (its length rule calibrated by other requests)."""
    target = tiny_target
    prompts = [encode(target, text) for text in PROMPTS]
    plain_engine = SpeculativeEngine(target, None, sampling=sampling)
    for seed in (0, 1, 2):
        prompt = prompts[seed % len(prompts)]
        reference = plain_engine.generate(prompt, max_new_tokens=32, seed=seed).tokens
        drafter = NgramDrafter() if tree == 0 else HiddenAnswerDrafter(prompt + reference, target.vocab_size)
        engine = SpeculativeEngine(target, drafter, DraftConfig(draft_len=4, verify="point-mass", length="fixed",
                                                                tree=tree), sampling)
        first = engine.generate(prompt, max_new_tokens=32, seed=seed)
        engine.generate(prompts[(seed + 1) % len(prompts)], max_new_tokens=20, seed=99)  # another request between
        again = engine.generate(prompt, max_new_tokens=32, seed=seed)
        assert first.tokens == reference == again.tokens
        assert first.stats.steps < len(reference) - 1 or tree == 0  # the tree accepted drafted tokens


# ------------------------------------------------------------------------ other drafters' branches
from diffdraft.draft_tree import followed, with_branch  # noqa: E402


def test_a_branch_shares_the_prefix_the_tree_holds_and_keeps_parents_first():
    tree = best_first(torch.tensor([[10, 11], [20, 21]]), torch.tensor([[0.6, 0.3], [0.5, 0.4]]), limit=4)
    merged = with_branch(tree, [10, 25, 30], [0.9, 0.8, 0.1])
    assert len(merged) == len(tree) + 2  # 10 is shared; 25 and 30 are new
    assert list(merged.values) == sorted(merged.values, reverse=True)
    assert all(p < i for i, p in enumerate(merged.parents))
    root_ten = merged.tokens.index(10)
    assert merged.parents[root_ten] == -1 and merged.values[root_ten] == pytest.approx(0.9)  # the larger value
    branch = [root_ten, merged.tokens.index(25), merged.tokens.index(30)]
    assert merged.parents[branch[1]] == branch[0] and merged.parents[branch[2]] == branch[1]
    path = [0, branch[0] + 1, branch[1] + 1]  # rows: the root, then nodes + 1
    assert followed(branch, path) == 2 and followed(branch, [0]) == 0


class UselessDrafter(Drafter):
    """Alternatives that are never right (tokens nobody emits): only a tree's lookup branch can be accepted."""

    name = "useless"

    def propose(self, state, tokens, num_tokens, sampling, generator) -> Draft:
        alternatives = torch.tensor([[297, 298, 299]] * num_tokens, dtype=torch.long)
        probs = torch.tensor([[0.5, 0.3, 0.2]] * num_tokens)
        return Draft(tokens=alternatives[:, 0].clone(), probs=None, confidence=probs[:, 0].clone(),
                     alternatives=(alternatives, probs))


def test_the_lookup_branch_is_accepted_where_the_drafter_fails(tiny_target):
    prompt = encode(tiny_target, "abcabcabcabc abcabcabcabc abcabcabcabc")
    reference = plain(tiny_target, prompt).tokens
    accepted = {}
    for lookup in (False, True):
        engine = SpeculativeEngine(tiny_target, UselessDrafter(),
                                   DraftConfig(draft_len=4, length="fixed", tree=8, lookup=lookup))
        result = engine.generate(prompt, max_new_tokens=len(reference))
        assert result.tokens == reference
        accepted[lookup] = sum(result.stats.accepted)
    assert accepted[False] == 0 and accepted[True] > 0, accepted
