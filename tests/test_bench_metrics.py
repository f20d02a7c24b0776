"""Benchmark arithmetic on hand-made traces: tau, histogram, speedup, min/median, equality."""

from __future__ import annotations

import pytest

from diffdraft.bench.decoders import PLAIN, parse_drafter_spec
from diffdraft.bench.metrics import (
    check_equality,
    decoder_figures,
    first_difference,
    summarize,
    summarize_temperature,
)
from diffdraft.bench.peers import trace_stats
from diffdraft.bench.store import stats_from_dict, stats_to_dict
from diffdraft.errors import DiffdraftError
from diffdraft.stats import Stats


def run(tokens, total_s, ttft_s=0.1, draft_len=0, steps=()):
    """One run as the runner records it; steps: (proposed, accepted, emitted) per verify step."""
    stats = Stats(draft_len=draft_len, new_tokens=len(tokens), ttft_s=ttft_s, total_s=total_s)
    for proposed, accepted, emitted in steps:
        stats.record_step(proposed, accepted, emitted)
    return {"tokens": list(tokens), "stop_reason": "length", "stats": stats_to_dict(stats), "loadavg": 0.0}


def record(decoder, prompt_id, runs, temperature=0.0, category="c", kind="engine"):
    return {"temperature": temperature, "prompt_id": prompt_id, "category": category, "decoder": decoder,
            "kind": kind, "runs": runs}


def test_stats_round_trip_keeps_the_trace():
    stats = Stats(draft_len=4, new_tokens=7, ttft_s=0.5, total_s=2.0)
    stats.record_step(4, 2, 3)
    stats.record_step(4, 4, 3)  # cut by the token limit
    back = stats_from_dict(stats_to_dict(stats))
    assert back == stats
    assert back.tau == 3.0


def test_tau_histogram_and_per_position_from_hand_made_traces():
    # prompt a: steps accepting 2 of 4 (emits 3) and 0 of 4 (emits 1); prompt b: 4 of 4 (emits 5)
    a = [run(range(5), 1.0, draft_len=4, steps=[(4, 2, 3), (4, 0, 1)])]
    b = [run(range(6), 1.0, draft_len=4, steps=[(4, 4, 5)])]
    plain = {"a": [run(range(5), 2.0)], "b": [run(range(6), 3.0)]}
    f = decoder_figures({"a": a, "b": b}, plain)
    assert f["steps"] == 3
    assert f["tau"] == pytest.approx((3 + 1 + 5) / 3)
    assert f["histogram"] == [1, 0, 1, 0, 1]
    # position 1: accepted in 2 of 3 steps; 2: 2 of 3; 3: 1 of 3; 4: 1 of 3
    assert f["per_position_acceptance"] == pytest.approx([2 / 3, 2 / 3, 1 / 3, 1 / 3])
    assert f["new_tokens"] == 11 and f["prompts"] == 2


def test_speedup_is_throughput_over_plain_on_the_same_prompts():
    plain = {"a": [run(range(10), 2.0)], "b": [run(range(10), 2.0)]}  # 20 tokens in 4 s: 5 tok/s
    fast = {"a": [run(range(10), 1.0)], "b": [run(range(10), 0.25)]}  # 20 tokens in 1.25 s: 16 tok/s
    f = decoder_figures(fast, plain)
    assert f["tokens_per_s"]["median_time"] == pytest.approx(16.0)
    assert f["speedup"]["median_time"] == pytest.approx(16.0 / 5.0)
    # per prompt: 2x and 8x -> median 5x
    assert f["speedup_median_over_prompts"] == pytest.approx(5.0)
    assert decoder_figures(plain, plain)["speedup"]["median_time"] == pytest.approx(1.0)


def test_time_per_step():
    r = run(range(4), 1.0, draft_len=2, steps=[(2, 1, 2), (2, 0, 1)])
    r["stats"].update(draft_s=0.010, verify_s=0.300)
    f = decoder_figures({"a": [r]}, {"a": [run(range(4), 1.0)]})
    assert f["draft_ms_per_step"] == pytest.approx(5.0) and f["verify_ms_per_step"] == pytest.approx(150.0)


def test_min_and_median_over_repeats():
    # three timed repeats per prompt: times 1, 3, 2 -> min 1, median 2
    runs = {"a": [run(range(12), 1.0, ttft_s=0.1), run(range(12), 3.0, ttft_s=0.3), run(range(12), 2.0, ttft_s=0.2)]}
    plain = {"a": [run(range(12), 4.0), run(range(12), 4.0), run(range(12), 6.0)]}
    f = decoder_figures(runs, plain)
    assert f["repeats"] == 3
    assert f["tokens_per_s"]["min_time"] == pytest.approx(12.0)
    assert f["tokens_per_s"]["median_time"] == pytest.approx(6.0)
    assert f["speedup"]["min_time"] == pytest.approx(12.0 / 3.0)  # plain's min time 4 s
    assert f["speedup"]["median_time"] == pytest.approx(6.0 / 3.0)  # plain's median time 4 s
    assert f["ttft_s"]["min_time"] == pytest.approx(0.1)
    assert f["ttft_s"]["median_time"] == pytest.approx(0.2)


def test_first_difference():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 9, 3]) == 1
    assert first_difference([1, 2, 3], [1, 2]) == 2  # a prefix differs at the shorter length
    assert first_difference([], []) is None


def test_equality_checker_catches_a_planted_mismatch():
    reference = {"p1": [5, 6, 7, 8], "p2": [1, 2, 3]}
    outputs = {"p1": [[5, 6, 7, 8], [5, 6, 0, 8]], "p2": [[1, 2, 3]]}  # repeat 1 of p1 differs at token 2
    found = check_equality(reference, outputs, {"p1": "math"})
    assert len(found) == 1
    m = found[0]
    assert (m.prompt_id, m.category, m.repeat, m.first_diff) == ("p1", "math", 1, 2)


def test_summary_flags_engine_mismatches_as_bugs_and_peer_mismatches_as_information():
    ref = [1, 2, 3, 4]
    records = [
        record(PLAIN, "p1", [run(ref, 2.0)], category="x"),
        record(PLAIN, "p2", [run(ref, 2.0)], category="y"),
        record("ngram", "p1", [run(ref, 1.0, draft_len=2, steps=[(2, 2, 3)])], category="x"),
        record("ngram", "p2", [run([1, 2, 9, 4], 1.0, draft_len=2, steps=[(2, 1, 2), (2, 0, 1)])], category="y"),
        record("peer", "p1", [run([1, 2, 3, 5], 0.5)], category="x", kind="peer"),
        record("peer", "p2", [run(ref, 0.5)], category="y", kind="peer"),
        record("ngram", "p3", [run(ref, 1.0)], category="y"),  # no plain run on p3: left out
    ]
    s = summarize_temperature(records, [PLAIN, "ngram", "peer"])
    assert s["prompts"] == 2 and s["without_plain"] == 1 and s["prompts_per_decoder"]["ngram"] == 2
    assert s["categories"] == ["x", "y"]
    assert s["equality"]["ngram"]["equal"] == 1 and s["equality"]["ngram"]["total"] == 2
    assert s["equality"]["peer"]["equal"] == 1
    assert s["equality"][PLAIN]["equal"] == 2
    assert [(b["decoder"], b["prompt_id"], b["first_diff"]) for b in s["bugs"]] == [("ngram", "p2", 2)]
    assert s["figures"]["x"]["ngram"]["tau"] == 3.0
    assert s["figures"]["all"]["ngram"]["tau"] == pytest.approx(6 / 3)
    assert s["figures"]["all"]["peer"]["speedup"]["median_time"] == pytest.approx(4.0)


def test_a_decoder_run_on_a_subset_is_measured_against_plain_on_that_subset():
    records = [
        record(PLAIN, "p1", [run([1, 2], 1.0)]),
        record(PLAIN, "p2", [run([1, 2, 3, 4], 4.0)]),
        record("slow", "p2", [run([1, 2, 3, 4], 8.0)]),
    ]
    s = summarize_temperature(records, [PLAIN, "slow"])
    assert s["prompts_per_decoder"] == {PLAIN: 2, "slow": 1}
    assert s["figures"]["all"]["slow"]["speedup"]["median_time"] == pytest.approx(0.5)  # plain on p2 only
    assert s["figures"]["all"][PLAIN]["tokens_per_s"]["median_time"] == pytest.approx(6 / 5)
    assert s["equality"]["slow"] == {"kind": "engine", "equal": 1, "total": 1, "mismatches": []}


def test_no_equality_at_temperature_one_and_temperatures_kept_apart():
    records = [
        record(PLAIN, "p1", [run([1, 2], 1.0)], temperature=1.0),
        record("ngram", "p1", [run([7, 8], 1.0)], temperature=1.0),
        record(PLAIN, "p1", [run([1, 2], 1.0)], temperature=0.0),
    ]
    s = summarize(records, [PLAIN, "ngram"])
    assert list(s) == ["0", "1"]
    assert "equality" not in s["1"] and "bugs" not in s["1"] and s["1"]["decoders"] == [PLAIN, "ngram"]
    assert s["1"]["same_tokens_as_plain"]["ngram"] == {"equal": 0, "total": 1}
    assert s["0"]["decoders"] == [PLAIN]


def test_summary_needs_plain_decoding():
    with pytest.raises(ValueError, match="plain"):
        summarize_temperature([record("ngram", "p1", [run([1], 1.0)])], ["ngram"])


def test_peer_trace_arithmetic():
    # HF prompt lookup: prefill forward (prompt of 10 + 3 candidates) emits 2; then [last + 3] emits 4,
    # [last + 3] emits 1, [last + 0] emits 1
    stats = trace_stats(inputs=[13, 4, 4, 1], emitted=[2, 4, 1, 1], draft_len=3)
    assert stats.new_tokens == 8
    assert stats.proposed == [3, 3, 0] and stats.accepted == [3, 0, 0] and stats.emitted == [4, 1, 1]
    assert stats.tau == pytest.approx(2.0)
    with pytest.raises(RuntimeError):
        trace_stats(inputs=[3, 1], emitted=[1], draft_len=0)


def test_drafter_specs():
    assert parse_drafter_spec("none", 8) == (PLAIN, "none", 0)
    assert parse_drafter_spec("ngram", 8) == ("ngram", "ngram", 8)
    assert parse_drafter_spec("early-exit@2", 8) == ("early-exit@2", "early-exit", 2)
    assert parse_drafter_spec("ngram@8", 8) == ("ngram", "ngram", 8)
    assert parse_drafter_spec("some@thing", 8) == ("some@thing", "some@thing", 8)
    assert parse_drafter_spec("@4", 8)[1] == "@4"  # no name before @: left whole for build_drafter to refuse
    with pytest.raises(DiffdraftError):
        parse_drafter_spec("", 8)


def test_drafter_folders_are_named_after_their_run(tmp_path):
    # A trainer writes RUN/drafter: two runs' drafters must get two names, options kept.
    for run in ("row-a", "row-b"):
        (tmp_path / run / "drafter").mkdir(parents=True)
    first = parse_drafter_spec(str(tmp_path / "row-a" / "drafter") + "@16", 8)
    second = parse_drafter_spec(str(tmp_path / "row-b" / "drafter") + ":steps=2@16", 8)
    assert first[0] == "row-a@16" and first[2] == 16
    assert second[0] == "row-b:steps=2@16" and second[1].endswith("drafter:steps=2")
    (tmp_path / "mine").mkdir()
    assert parse_drafter_spec(str(tmp_path / "mine"), 8)[0] == "mine"
