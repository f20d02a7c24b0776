"""The pure verifiers of diffdraft.verify, against exact laws computed by enumeration.

Statistical tests: a tiny "target" is a table of conditional distributions p(x | last two
tokens) over a vocabulary of V = 5 tokens, a "drafter" a different table q(x | last token).
Both start as logits and are shaped by diffdraft.sampling.logits_to_probs with the same
SamplingConfig (temperature, top-k, top-p), as the engine does. A pure speculative loop
drafts g tokens from q (token i drawn from q given the earlier draft tokens), verifies
them against p, and repeats until L = 3 tokens are out. The empirical law of those L
tokens (V**L = 125 outcomes) is compared with the exact target law
prod_t p(x_t | x_<t) by Pearson's chi-square (see lawcheck.py: outcomes expected < 5 times
pooled, threshold = Wilson-Hilferty chi-square quantile at alpha = 1e-4, and any outcome of
probability 0 that appears fails at once). Deliberately wrong verifiers go through the
same loop and the same check, and must be caught by it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from diffdraft.config import SamplingConfig
from diffdraft.sampling import logits_to_probs, sample
from diffdraft.verify import Verdict, verify_greedy, verify_point_mass, verify_rejection
from lawcheck import fit

V = 5  # vocabulary
L = 3  # tokens whose joint law is checked
N = 6_000  # samples per statistical check

SHAPES = {
    "t1": SamplingConfig(temperature=1.0),
    "t0.7-topk3": SamplingConfig(temperature=0.7, top_k=3),
    "t1.5-topp0.8": SamplingConfig(temperature=1.5, top_p=0.8),
    "t0.9-topk4-topp0.85": SamplingConfig(temperature=0.9, top_k=4, top_p=0.85),
}


# ----------------------------------------------------------------------------- tables
class Tables:
    """Target p(x | last two tokens) and drafter q(x | last token), as shaped probability tables.

    Contexts shorter than the table's order are padded with a start symbol (index V).
    """

    def __init__(self, sampling: SamplingConfig, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.p_logits = 1.5 * torch.randn(V + 1, V + 1, V, generator=gen)  # [prev2, prev1, V]
        # The drafter knows only the last token: roughly the target averaged over prev2, plus noise,
        # so that it agrees often but not always.
        self.q_logits = self.p_logits.mean(dim=0) + 0.9 * torch.randn(V + 1, V, generator=gen)  # [prev1, V]
        self.p = logits_to_probs(self.p_logits, sampling)  # [V+1, V+1, V]
        self.q = logits_to_probs(self.q_logits, sampling)  # [V+1, V]
        self.q_raw = torch.softmax(self.q_logits, dim=-1)  # NOT what tokens are drawn from

    def p_row(self, context: list[int]) -> torch.Tensor:
        padded = [V, V] + context
        return self.p[padded[-2], padded[-1]]

    def exact_law(self) -> dict[tuple[int, ...], float]:
        """P(x_1..x_L) = prod_t p(x_t | x_<t), enumerated over all V**L sequences."""
        law = {}
        for seq in itertools.product(range(V), repeat=L):
            prob = 1.0
            for t in range(L):
                prob *= float(self.p_row(list(seq[:t]))[seq[t]])
            law[seq] = prob
        return law


def speculative_samples(tables: Tables, verifier, g: int, n: int, seed: int, raw_q: bool = False):
    """n runs of the pure speculative loop; returns (first-L-token tuples, accepted counts).

    verifier(draft [g], q [g, V], p [g+1, V], generator) -> Verdict. Draft token i is drawn
    from q given the context and the earlier draft tokens; raw_q hands the verifier the
    unshaped softmax instead (tokens are still drawn from the shaped q). The runs advance
    in lockstep so that drafting is vectorized; each block is verified on its own.
    """
    gen = torch.Generator().manual_seed(seed)
    outs: list[list[int]] = [[] for _ in range(n)]
    accepted: list[int] = []
    active = list(range(n))
    while active:
        m = len(active)
        padded = [[V, V] + outs[j] for j in active]
        hist = torch.empty(m, 2 + g, dtype=torch.long)  # [m, 2+g]: last two context tokens, then the draft
        hist[:, 0] = torch.tensor([row[-2] for row in padded])
        hist[:, 1] = torch.tensor([row[-1] for row in padded])
        q_told = torch.zeros(m, g, V)  # [m, g, V]
        for i in range(g):
            q = tables.q[hist[:, i + 1]]  # [m, V]: law of draft token i given everything before it
            hist[:, i + 2] = torch.multinomial(q, 1, generator=gen)[:, 0]
            q_told[:, i] = tables.q_raw[hist[:, i + 1]] if raw_q else q
        p_rows = tables.p[hist[:, :-1], hist[:, 1:]]  # [m, g+1, V]: row i given context + draft[:i]
        drafts = hist[:, 2:]  # [m, g]
        for row, j in enumerate(active):
            verdict = verifier(drafts[row], q_told[row], p_rows[row], gen)
            assert len(verdict.tokens) == verdict.num_accepted + 1
            assert verdict.tokens[: verdict.num_accepted] == drafts[row, : verdict.num_accepted].tolist()
            accepted.append(verdict.num_accepted)
            outs[j].extend(verdict.tokens)
        active = [j for j in active if len(outs[j]) < L]
    return [tuple(out[:L]) for out in outs], accepted


def rejection(draft, q, p, gen):
    return verify_rejection(draft, q, p, gen)


def point_mass(draft, q, p, gen):
    return verify_point_mass(draft, p, gen)


# --------------------------------------------------------------- deliberately wrong verifiers
def _verdict(draft: torch.Tensor, k: int, last: int) -> Verdict:
    return Verdict(num_accepted=k, tokens=draft[:k].tolist() + [last], draft_len=draft.shape[0])


def wrong_ignores_q(draft, q, p, gen):
    """Accepts x_i with probability min(1, p_i(x_i)), as if q did not matter."""
    for i, x in enumerate(draft.tolist()):
        if float(torch.rand(1, generator=gen)) >= float(p[i, x]):
            residual = (p[i] - q[i]).clamp(min=0)
            law = residual / residual.sum() if float(residual.sum()) > 0 else p[i]
            return _verdict(draft, i, int(sample(law, gen)))
    return _verdict(draft, draft.shape[0], int(sample(p[-1], gen)))


def wrong_resamples_from_p(draft, q, p, gen):
    """Right acceptance rule, but a rejected position resamples from p instead of the residual."""
    for i, x in enumerate(draft.tolist()):
        if float(torch.rand(1, generator=gen)) >= float(p[i, x] / q[i, x]):
            return _verdict(draft, i, int(sample(p[i], gen)))
    return _verdict(draft, draft.shape[0], int(sample(p[-1], gen)))


def wrong_point_mass(draft, q, p, gen):
    """Accepts x_i with probability p_i(x_i) instead of matching a draw y_i ~ p_i; on a miss draws from p_i."""
    for i, x in enumerate(draft.tolist()):
        if float(torch.rand(1, generator=gen)) >= float(p[i, x]):
            return _verdict(draft, i, int(sample(p[i], gen)))
    return _verdict(draft, draft.shape[0], int(sample(p[-1], gen)))


# ------------------------------------------------------------------------ statistical tests
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("mode", ["rejection", "point-mass"])
def test_speculative_law_equals_target_law(mode, shape):
    """Emitted sequences follow the target law exactly (chi-square at alpha 1e-4, N = 6k)."""
    tables = Tables(SHAPES[shape], seed=1)
    verifier = rejection if mode == "rejection" else point_mass
    g = 2 if "topk" in shape else 3
    samples, accepted = speculative_samples(tables, verifier, g=g, n=N, seed=11)
    result = fit(samples, tables.exact_law())
    print(result)
    assert result.ok, f"{mode} / {shape}: {result}"
    # Both paths were exercised: rejections (recovered tokens) and full acceptance (bonus tokens).
    assert 0 in accepted and g in accepted


@pytest.mark.parametrize(
    "wrong, shape",
    [
        (wrong_ignores_q, "t1"),
        (wrong_resamples_from_p, "t1"),
        (wrong_point_mass, "t1.5-topp0.8"),
    ],
)
def test_wrong_verifier_is_detected(wrong, shape):
    """Negative control: the same loop and check reject a verifier that is not lossless."""
    tables = Tables(SHAPES[shape], seed=1)
    samples, _ = speculative_samples(tables, wrong, g=3, n=N, seed=11)
    result = fit(samples, tables.exact_law())
    print(result)
    assert not result.ok, f"{wrong.__name__} passed: {result}"


def test_raw_logits_as_q_is_detected():
    """Negative control for the known failure of docs/design.md, 'Verification': tokens drawn from the top-k-shaped q,
    but the verifier is handed the softmax of the raw logits as q."""
    shape = "t0.7-topk3"
    tables = Tables(SHAPES[shape], seed=1)
    # The same tables, seed and g verified with the right q pass in test_speculative_law_equals_target_law.
    bad, _ = speculative_samples(tables, rejection, g=2, n=N, seed=11, raw_q=True)
    result = fit(bad, tables.exact_law())
    print(result)
    assert not result.ok, f"raw q passed: {result}"


@pytest.mark.parametrize("mode", ["rejection", "point-mass"])
def test_empty_draft_samples_from_p(mode):
    """g = 0: the verifier is plain sampling; the law of L tokens is still the target's."""
    tables = Tables(SHAPES["t0.9-topk4-topp0.85"], seed=2)
    verifier = rejection if mode == "rejection" else point_mass
    samples, accepted = speculative_samples(tables, verifier, g=0, n=N // 2, seed=5)
    assert set(accepted) == {0}
    result = fit(samples, tables.exact_law())
    assert result.ok, str(result)


# ------------------------------------------------------------- the worked example of docs/design.md
P_EX = torch.tensor([0.6, 0.3, 0.1])
Q_EX = torch.tensor([0.4, 0.5, 0.1])
BONUS_ROW = torch.tensor([0.0, 0.0, 1.0])  # bonus token is always C: easy to tell apart
A, B, C = 0, 1, 2


def test_design_example_rejected_b_resamples_a():
    """p = {A:.6, B:.3, C:.1}, q = {A:.4, B:.5, C:.1}: draft B is accepted with probability
    p/q = .6, and a rejected B always becomes A (the residual is {A:.2, B:0, C:0})."""
    gen = torch.Generator().manual_seed(0)
    n = 4000
    accepted = 0
    for _ in range(n):
        verdict = verify_rejection(torch.tensor([B]), Q_EX[None], torch.stack([P_EX, BONUS_ROW]), gen)
        if verdict.num_accepted == 1:
            assert verdict.tokens == [B, C] and verdict.bonus
            accepted += 1
        else:
            assert verdict.tokens == [A] and not verdict.bonus
    rate = accepted / n
    assert abs(rate - 0.6) < 4.5 * math.sqrt(0.6 * 0.4 / n), rate


@pytest.mark.parametrize("token", [A, C])
def test_design_example_tokens_with_p_at_least_q_always_accepted(token):
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        verdict = verify_rejection(torch.tensor([token]), Q_EX[None], torch.stack([P_EX, BONUS_ROW]), gen)
        assert verdict.tokens == [token, C]


def test_design_example_first_token_law():
    """Draft x ~ q, verify against p: the emitted token is distributed as p = (.6, .3, .1)."""
    gen = torch.Generator().manual_seed(2)
    n = 6000
    drafts = torch.multinomial(Q_EX, n, replacement=True, generator=gen)
    out = [verify_rejection(x[None], Q_EX[None], torch.stack([P_EX, BONUS_ROW]), gen).tokens[0] for x in drafts]
    assert fit(out, {A: 0.6, B: 0.3, C: 0.1}).ok


def test_rejection_refuses_token_impossible_under_q():
    with pytest.raises(ValueError):
        verify_rejection(torch.tensor([1]), torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5], [0.5, 0.5]]), None)


def test_rejection_checks_q_shape():
    with pytest.raises(ValueError):
        verify_rejection(torch.tensor([1]), torch.full((2, 2), 0.5), torch.full((2, 2), 0.5), None)


@pytest.mark.parametrize("verifier", ["greedy", "rejection", "point-mass"])
def test_shape_mismatch_is_refused(verifier):
    draft = torch.tensor([0, 1])
    p = torch.full((2, 3), 1 / 3)  # should be [3, 3]
    with pytest.raises(ValueError):
        if verifier == "greedy":
            verify_greedy(draft, p)
        elif verifier == "rejection":
            verify_rejection(draft, torch.full((2, 3), 1 / 3), p, None)
        else:
            verify_point_mass(draft, p, None)


def test_point_mass_identical_rows_accept_what_matches_draws():
    """Point mass on one-hot rows is deterministic: accept while the draft equals each row's token."""
    rows = torch.eye(4)[[2, 0, 3, 1]]  # [4, 4]: the target's tokens are 2, 0, 3 and then 1
    gen = torch.Generator().manual_seed(0)
    assert verify_point_mass(torch.tensor([2, 0, 3]), rows, gen).tokens == [2, 0, 3, 1]
    assert verify_point_mass(torch.tensor([2, 1, 3]), rows, gen).tokens == [2, 0]
    assert verify_point_mass(torch.tensor([3, 0, 3]), rows, gen).tokens == [2]


# ---------------------------------------------------------------------------------- greedy
def reference_greedy(draft: list[int], scores: torch.Tensor) -> tuple[int, list[int]]:
    best = scores.argmax(dim=-1).tolist()
    k = 0
    while k < len(draft) and draft[k] == best[k]:
        k += 1
    return k, draft[:k] + [best[k]]


def test_greedy_accepts_longest_matching_prefix():
    gen = torch.Generator().manual_seed(0)
    seen = set()
    for trial in range(400):
        g = trial % 6
        vocab = 7
        scores = torch.randn(g + 1, vocab, generator=gen)
        best = scores.argmax(dim=-1)
        draft = best[:g].clone()
        for i in range(g):  # corrupt some positions
            if float(torch.rand(1, generator=gen)) < 0.25:
                draft[i] = (draft[i] + 1 + int(torch.randint(vocab - 1, (1,), generator=gen))) % vocab
        k, tokens = reference_greedy(draft.tolist(), scores)
        for as_probs in (False, True):
            verdict = verify_greedy(draft, scores.softmax(-1) if as_probs else scores)
            assert verdict.num_accepted == k
            assert verdict.tokens == tokens
            assert verdict.draft_len == g
            assert verdict.bonus == (k == g)
        seen.add((k == g, g))
    assert any(full for full, g in seen if g > 0) and any(not full for full, _ in seen)


def test_greedy_hand_example():
    scores = torch.tensor(
        [
            [0.0, 5.0, 1.0],  # argmax 1
            [3.0, 0.0, 1.0],  # argmax 0
            [0.0, 1.0, 9.0],  # argmax 2
            [0.0, 7.0, 1.0],  # argmax 1 (bonus row)
        ]
    )
    full = verify_greedy(torch.tensor([1, 0, 2]), scores)
    assert (full.num_accepted, full.tokens, full.bonus) == (3, [1, 0, 2, 1], True)
    middle = verify_greedy(torch.tensor([1, 0, 0]), scores)
    assert (middle.num_accepted, middle.tokens, middle.bonus) == (2, [1, 0, 2], False)
    first = verify_greedy(torch.tensor([2, 0, 2]), scores)  # a later match does not count
    assert (first.num_accepted, first.tokens, first.bonus) == (0, [1], False)


def test_empty_draft_every_verifier():
    empty = torch.zeros(0, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    greedy = verify_greedy(empty, torch.tensor([[0.1, 2.0, 0.3]]))
    assert (greedy.num_accepted, greedy.tokens, greedy.draft_len) == (0, [1], 0)
    assert greedy.bonus  # the whole (empty) draft was accepted: the one token is the bonus
    one_hot = torch.tensor([[0.0, 0.0, 1.0]])
    assert verify_rejection(empty, torch.zeros(0, 3), one_hot, gen).tokens == [2]
    assert verify_point_mass(empty, one_hot, gen).tokens == [2]


def test_verdict_bonus_property():
    assert Verdict(num_accepted=3, tokens=[1, 2, 3, 4], draft_len=3).bonus
    assert not Verdict(num_accepted=2, tokens=[1, 2, 4], draft_len=3).bonus
