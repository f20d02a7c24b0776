"""The cost-aware length rule (draft_length.py) on hand-made costs and confidences, and its
losslessness through the whole engine against enumeration, with a negative control: a rule
that peeks at the target's logits before choosing must be caught."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.costs import cost_curve
from diffdraft.draft_length import (PROBE_EVERY, AcceptanceCalibration, CostCurve, DraftingValue, LengthPolicy,
                                   expected_emitted)
from diffdraft.drafters.base import Draft, Drafter
from diffdraft.engine import SpeculativeEngine
from diffdraft.sampling import logits_to_probs
from lawcheck import fit
from test_engine import LAW_PROMPT, drafter_for, engine_samples, exact_law, make_small_target

CPU_LIKE = CostCurve(target_s=(1.0, 1.1, 1.2, 2.0), draft_s=0.1)  # a steep step after 3 tokens
GPU_LIKE = CostCurve(target_s=(1.0,) * 17, draft_s=0.1)  # 16 tokens cost what one does


def conf(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_expected_emitted_by_hand():
    # a = 0.9, 0.8, 0.1: E[A_k] = 0.9, 0.9 + 0.72, 0.9 + 0.72 + 0.072
    got = expected_emitted(torch.tensor([0.9, 0.8, 0.1], dtype=torch.float64))
    assert got.tolist() == pytest.approx([1.0, 1.9, 2.62, 2.692])


def test_choice_by_hand_on_a_cpu_like_curve():
    """Fresh calibration, no optimism: a_i is the confidence itself. Rates for k = 0..3:
    1/1.1 = 0.91, 1.9/1.2 = 1.58, 2.62/1.3 = 2.02, 2.692/2.1 = 1.28 -> k = 2."""
    policy = LengthPolicy(CPU_LIKE, explore=0.0)
    rates = policy.rates(conf(0.9, 0.8, 0.1), 3, greedy=True)
    assert rates.tolist() == pytest.approx([1 / 1.1, 1.9 / 1.2, 2.62 / 1.3, 2.692 / 2.1])
    assert policy.choose(conf(0.9, 0.8, 0.1), 3, greedy=True) == 2
    assert policy.choose(conf(0.05, 0.05, 0.05), 3, greedy=True) == 0  # not worth a longer forward
    # even a sure draft stops before the step in cost: 3.94 / 2.1 = 1.88 < 2.97 / 1.3 = 2.28
    assert policy.choose(conf(0.99, 0.99, 0.99), 3, greedy=True) == 2
    assert LengthPolicy(GPU_LIKE, explore=0.0).choose(conf(0.99, 0.99, 0.99), 3, greedy=True) == 3
    assert policy.choose(conf(0.9, 0.8), 0, greedy=True) == 0  # nothing drafted


def test_the_same_rule_drafts_long_where_long_forwards_are_cheap():
    confidences = torch.full((15,), 0.6)
    assert LengthPolicy(GPU_LIKE, explore=0.0).choose(confidences, 15, greedy=True) == 15
    assert LengthPolicy(CPU_LIKE, explore=0.0).choose(confidences, 15, greedy=True) <= 2


def test_longest_useful_and_extrapolation():
    # the mean step of the upper half of the curve, (2.0 - 1.1) / 2, repeated
    assert CPU_LIKE.target(6) == pytest.approx(2.0 + 0.45 * 2)
    # (1 + k) / (0.1 + c(k + 1)) >= 1 / 1.1: k = 3 gives 4 / 2.1 >= 0.91, k = 15 gives 16 / 7.5
    assert CPU_LIKE.longest_useful(15) == 15
    steep = CostCurve(target_s=(1.0, 3.0, 5.0), draft_s=0.0)  # c(k) = 2k - 1: nothing pays
    assert steep.longest_useful(8) == 0
    with pytest.raises(ValueError):
        CostCurve(target_s=())


def test_a_drafter_whose_call_grows_with_the_slots_is_asked_for_as_many_as_pay():
    """d(n) = d(1) + (n - 1) d_slot. Fresh calibration, no optimism: every slot's acceptance is NO_CONFIDENCE
    (0.5), so 1 + E[A_n] = 1.5, 1.75, 1.875, 1.9375; on CPU_LIKE with d(1) = 0.1 and 0.05 a slot the rates
    for n = 1..4 are 1.5 / 1.2, 1.75 / 1.35, 1.875 / 1.5, 1.9375 / 2.35 -> n = 2. A call that costs the same
    for any count is asked for everything, as before."""
    growing = CostCurve(target_s=CPU_LIKE.target_s, draft_s=0.1, draft_slot_s=0.05)
    assert growing.draft(1) == pytest.approx(0.1) and growing.draft(4) == pytest.approx(0.25)
    assert LengthPolicy(growing, explore=0.0).proposal(4, greedy=True) == 2
    assert LengthPolicy(CPU_LIKE, explore=0.0).proposal(4, greedy=True) == 4
    policy = LengthPolicy(growing, explore=0.0)
    for _ in range(50):  # slots 1 and 2 always accepted, 3 never: n = 2 or 3 is worth asking for, not 1
        policy.observe(conf(0.5, 0.5, 0.5), 3, 2, greedy=True)
    assert policy.proposal(4, greedy=True) in (2, 3) and policy.proposal(4, greedy=False) == 2
    # the cost of what was asked is spent whatever is verified: rates for k = 0..2 after asking for 4
    rates = LengthPolicy(growing, explore=0.0).rates(conf(0.5, 0.5), 2, greedy=True)
    assert rates.tolist() == pytest.approx([1 / 1.15, 1.5 / 1.25, 1.75 / 1.35])
    assert growing.in_batch(2).draft_slot_s == 0.05 and growing.to_dict()["draft_slot_ms"] == 50.0
    with pytest.raises(ValueError):
        CostCurve(target_s=(1.0,), draft_slot_s=-1.0)


def test_calibration_learns_from_observed_acceptance():
    calibration = AcceptanceCalibration()
    before = calibration.estimate(conf(0.9, 0.9), 2)
    assert before.tolist() == pytest.approx([0.9, 0.9])
    for _ in range(40):  # the drafter says 0.9 at slot 1 but is always wrong there
        calibration.observe(conf(0.9, 0.9), verified=2, accepted=0)
    after = calibration.estimate(conf(0.9, 0.9), 2)
    assert after[0] < 0.1
    assert after[1] == pytest.approx(0.9)  # slot 2 was never reached: still the prior
    policy = LengthPolicy(CPU_LIKE, explore=0.0)
    policy._calibration[True, "drafter"] = calibration
    assert policy.choose(conf(0.9, 0.9), 2, greedy=True) == 0
    assert policy.choose(conf(0.9, 0.9), 2, greedy=False) == 2  # sampled decoding keeps its own table


def test_optimism_tries_a_slot_that_looks_poor_until_it_is_known():
    policy = LengthPolicy(CPU_LIKE)  # default optimism
    low = conf(0.02)
    assert policy.choose(low, 1, greedy=True) == 1  # never seen: tried
    for _ in range(200):
        policy.observe(low, verified=1, accepted=0, greedy=True)
    assert policy.choose(low, 1, greedy=True) == 0  # known to fail: no longer verified


def test_measured_costs_are_cached_per_machine_and_model(tiny_target, isolated_cache, capsys):
    drafter = drafter_for("early-exit-1", tiny_target)
    first = cost_curve(tiny_target, drafter, 4)
    assert len(first.target_s) == 5 and first.draft_s > 0 and first.draft_slot_s >= 0
    assert capsys.readouterr().err.startswith("diffdraft: measuring this machine's step costs")  # one line, once
    files = list((isolated_cache / "costs").glob("*.json"))
    assert len(files) == 1
    assert cost_curve(tiny_target, drafter, 4) == first  # read back, not measured again
    assert capsys.readouterr().err == ""
    before = torch.get_num_threads()
    torch.set_num_threads(1 if before != 1 else 2)
    try:
        cost_curve(tiny_target, drafter, 4)  # another thread count is another key
    finally:
        torch.set_num_threads(before)
    assert len(list((isolated_cache / "costs").glob("*.json"))) == 2
    files[0].write_text("{not json")
    assert len(cost_curve(tiny_target, drafter, 4).target_s) == 5  # a damaged entry is measured again
    tiny_target.fused_build = "another-build"  # other fused C++ code (backends/fused.py) is another key
    cost_curve(tiny_target, drafter, 4)
    assert len(list((isolated_cache / "costs").glob("*.json"))) == 3


def test_cost_measurement_stops_at_its_time_budget(tiny_target, monkeypatch):
    from diffdraft import costs

    calls = []
    real = tiny_target.forward
    monkeypatch.setattr(tiny_target, "forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    curve = costs.measure_target(tiny_target, 3, rounds=7, budget_s=0.0)
    assert len(curve) == 3 and len(calls) == 1 + 3  # the warm-up, then one round of k = 1, 2, 3
    calls.clear()
    costs.measure_target(tiny_target, 3, rounds=7, budget_s=60.0)
    assert len(calls) == 1 + 7 * 3


# ------------------------------------------------------------------ losslessness through the engine
N_RUNS = 1000
T1 = SamplingConfig(temperature=1.0)


class AlwaysDraft(DraftingValue):
    """Never skips the drafter (the rule without its skip, for controls)."""

    def draft_now(self, costs=None, sequences=1) -> bool:
        return True


@pytest.fixture(scope="module")
def small_target():
    return make_small_target()


@pytest.mark.parametrize("proposals, skipping", [("argmax", True), ("sample", False)])
def test_sampling_law_with_the_adaptive_length(small_target, proposals, skipping, isolated_cache):
    """T = 1, default length rule (measured costs, calibrated confidences, optimism), draft up to 2:
    the first 3 tokens follow the target's exact law (chi-square, alpha 1e-4). With the drafting-skip
    rule on, steps after an unpaid draft run plain (length 0); with it off, the rule chose every length
    from 0 to 2 along the way."""
    draft = DraftConfig(2, proposals=proposals)
    engine = SpeculativeEngine(small_target, drafter_for("early-exit-1", small_target), draft, T1)
    assert engine.policy is not None
    if not skipping:
        engine.policy.new_value = lambda: AlwaysDraft(engine.policy.costs)
    samples, chosen = engine_samples(engine, N_RUNS, trace="proposed")
    result = fit(samples, exact_law(small_target, LAW_PROMPT, T1))
    print(proposals, result, {k: chosen.count(k) for k in set(chosen)})
    assert result.ok, f"{proposals}: {result}"
    if skipping:  # some steps drafted, some ran plain (the measured costs decide which lengths drafting took)
        assert 0 in chosen and len(set(chosen)) >= 2
    else:
        assert {0, 1, 2} <= set(chosen)


class _Recording(Drafter):
    """Passes through another drafter and keeps what it was asked and what it drafted."""

    def __init__(self, inner: Drafter):
        self.inner, self.name, self.wants_taps, self.states_q = inner, inner.name, inner.wants_taps, inner.states_q
        self.tokens: list[int] = []
        self.draft = None

    def new_state(self):
        return self.inner.new_state()

    def begin(self, state, prompt, taps):
        self.inner.begin(state, prompt, taps)

    def observe(self, state, taps):
        self.inner.observe(state, taps)

    def propose(self, state, tokens, num_tokens, sampling, generator):
        self.tokens, self.draft = list(tokens), self.inner.propose(state, tokens, num_tokens, sampling, generator)
        return self.draft


class _PeekingPolicy(LengthPolicy):
    """Lossy on purpose: verifies the first drafted token only when the target would surely accept
    it (p >= q), which it can tell only by running the target on this step's draft."""

    def __init__(self, target, drafter: _Recording, sampling: SamplingConfig):
        super().__init__(CostCurve(target_s=(1.0, 1.0, 1.0)))
        self.target, self.drafter, self.sampling = target, drafter, sampling

    def choose(self, confidence, available, greedy, costs=None):
        if available == 0:
            return 0
        x = int(self.drafter.draft.tokens[0])
        with torch.no_grad():
            logits = self.target.module(torch.tensor([self.drafter.tokens])).logits[0, -1]
        p = logits_to_probs(logits, self.sampling)
        return 1 if float(p[x]) >= float(self.drafter.draft.probs[0, x]) else 0


def test_law_check_catches_a_policy_that_peeks_at_the_target(small_target):
    drafter = _Recording(drafter_for("early-exit-1", small_target))
    policy = _PeekingPolicy(small_target, drafter, T1)
    engine = SpeculativeEngine(small_target, drafter, DraftConfig(2, verify="rejection", proposals="sample"), T1,
                               policy=policy)
    samples, _ = engine_samples(engine, N_RUNS)
    result = fit(samples, exact_law(small_target, LAW_PROMPT, T1))
    print("peeking", result)
    assert not result.ok, f"the peeking policy passed: {result}"


def test_engine_without_drafter_or_with_a_cut_has_no_policy(tiny_target):
    assert SpeculativeEngine(tiny_target, None).policy is None
    ngram = drafter_for("ngram", tiny_target)
    assert SpeculativeEngine(tiny_target, ngram, DraftConfig(4, min_confidence=0.5)).policy is None
    assert SpeculativeEngine(tiny_target, ngram, DraftConfig(4, length="fixed")).policy is None


def test_drafting_is_skipped_while_it_does_not_pay_and_probed_again():
    """Plain steps cost c(1) = 1 s (rate 1 token/s). Drafting steps that emit 1 token for d + c(2) = 2.1 s
    do not pay: the request then skips the drafter, drafting again on every PROBE_EVERY-th step."""
    value = LengthPolicy(CostCurve(target_s=(1.0, 2.0), draft_s=0.1)).new_value()
    assert value.draft_now()  # nothing known yet: draft
    value.observe(verified=1, accepted=0)
    decisions = [value.draft_now() for _ in range(3 * PROBE_EVERY)]
    assert decisions == ([False] * (PROBE_EVERY - 1) + [True]) * 3
    for _ in range(20):  # drafting that pays again: 3 tokens per 2.1 s
        value.observe(verified=1, accepted=2)
    assert all(value.draft_now() for _ in range(PROBE_EVERY))


def test_a_batch_probes_one_request_in_as_many_steps_as_it_holds():
    """In a step shared by 4 requests each skipping request probes every 4 * PROBE_EVERY-th step, so the batch
    as a whole probes about once per PROBE_EVERY steps."""
    value = LengthPolicy(CostCurve(target_s=(1.0, 2.0), draft_s=0.1)).new_value()
    value.observe(verified=1, accepted=0)
    decisions = [value.draft_now(sequences=4) for _ in range(8 * PROBE_EVERY)]
    assert decisions == ([False] * (4 * PROBE_EVERY - 1) + [True]) * 2


def test_a_request_in_a_batch_prices_rows_as_its_share_of_the_step():
    curve = CostCurve(target_s=(10.0, 11.0, 12.0, 13.0, 30.0, 40.0), draft_s=2.0)  # beyond: +28 / 3 per row
    assert curve.in_batch(1) is curve
    shared = curve.in_batch(4)  # c(4) = 13 for four requests: 3.25 each; a request's k - 1 extra rows add c(3 + k) - c(4)
    assert shared.target_s == pytest.approx((3.25, 20.25, 30.25, 3.25 + 40 + 28 / 3 - 13, 3.25 + 40 + 56 / 3 - 13,
                                             3.25 + 40 + 28 - 13))
    assert shared.draft_s == 2.0
    # where a batch's extra rows are dear, a request that would draft 3 tokens alone verifies none
    policy = LengthPolicy(curve, explore=0.0)
    sure = torch.full((3,), 0.9)
    assert policy.choose(sure, 3, greedy=True) == 3 and policy.choose(sure, 3, greedy=True, costs=shared) == 0


def test_drafting_value_by_hand():
    value = DraftingValue(CostCurve(target_s=(1.0, 1.5), draft_s=0.0))
    assert value.pays()
    value.observe(verified=1, accepted=1)  # 2 tokens in 1.5 s: 1.33 tokens/s against 1 for a plain step
    assert value.pays()
    assert not DraftingValue(CostCurve(target_s=(0.5, 1.5), draft_s=0.0), emitted=2, seconds=1.5).pays()


class AlwaysWrong(Drafter):
    """Proposes a token plain decoding never emits (id 299 of the tiny vocabulary), sure of it; counts calls."""

    name = "always-wrong"

    def __init__(self):
        self.calls = 0

    def propose(self, state, tokens, num_tokens, sampling, generator):
        self.calls += 1
        n = min(num_tokens, 2)
        return Draft(tokens=torch.full((n,), 299), probs=None, confidence=torch.full((n,), 0.9))


@pytest.mark.parametrize("skip", [True, False])
def test_engine_skips_a_drafter_that_never_pays_and_stays_lossless(tiny_target, skip):
    """A drafter that is always wrong, on costs where drafting is dear: after the first steps the engine
    runs plain steps (no drafter call), probing every PROBE_EVERY-th step, and the tokens equal plain
    decoding. Negative control (skip=False): a policy that always drafts calls the drafter every step."""
    drafter = AlwaysWrong()
    policy = LengthPolicy(CostCurve(target_s=(0.01, 0.03, 0.05, 0.07, 0.09), draft_s=0.01))
    if not skip:
        policy.new_value = lambda: AlwaysDraft(policy.costs)
    prompt = [5, 6, 7, 8, 5, 6, 7, 9]
    result = SpeculativeEngine(tiny_target, drafter, DraftConfig(4), policy=policy).generate(prompt, max_new_tokens=48)
    plain = SpeculativeEngine(tiny_target, None).generate(prompt, max_new_tokens=48)
    assert result.tokens == plain.tokens and 299 not in plain.tokens
    steps = len(result.stats.proposed)
    if skip:
        assert drafter.calls <= steps // PROBE_EVERY + 2, (drafter.calls, steps)
    else:
        assert drafter.calls == steps
