"""Stats arithmetic on hand-made traces, with the expected numbers worked out by hand."""

from __future__ import annotations

import pytest

from diffdraft.stats import Stats

# (proposed, accepted, emitted) per verify step, draft length 4:
TRACE = [
    (4, 2, 3),  # two accepted, then the recovered token
    (4, 4, 5),  # all accepted, then the bonus token
    (4, 0, 1),  # first draft token rejected
    (4, 2, 3),
    (2, 1, 2),  # only two proposed (near the token limit)
    (4, 4, 3),  # all accepted but the output was cut at the token limit / EOS
]


def make(trace=TRACE, draft_len=4, new_tokens=18, ttft=0.5, total=2.0) -> Stats:
    stats = Stats(draft_len=draft_len)
    for proposed, accepted, emitted in trace:
        stats.record_step(proposed=proposed, accepted=accepted, emitted=emitted)
    stats.new_tokens = new_tokens
    stats.ttft_s = ttft
    stats.total_s = total
    return stats


def test_tau_is_tokens_per_verify_step():
    stats = make()
    assert stats.steps == 6
    assert stats.tau == pytest.approx(17 / 6)  # (3 + 5 + 1 + 3 + 2 + 3) / 6


def test_histogram_counts_accepted_lengths():
    # accepted = 2, 4, 0, 2, 1, 4 -> k=0: 1, k=1: 1, k=2: 2, k=3: 0, k=4: 2
    assert make().histogram() == [1, 1, 2, 0, 2]


def test_per_position_acceptance():
    # position 1: proposed in all 6 steps, accepted in 5 (all but the 0-accept step)
    # position 2: proposed in all 6, accepted where accepted >= 2: steps 1, 2, 4, 6 -> 4/6
    # position 3: proposed in the 5 steps with 4 proposed, accepted where accepted >= 3: steps 2, 6 -> 2/5
    # position 4: the same 5 steps, accepted >= 4: steps 2, 6 -> 2/5
    assert make().per_position_acceptance() == pytest.approx([5 / 6, 4 / 6, 2 / 5, 2 / 5])


def test_histogram_grows_to_the_longest_proposal():
    stats = make(trace=[(6, 5, 6), (2, 0, 1)], draft_len=3)
    assert stats.histogram() == [1, 0, 0, 0, 0, 1, 0]
    assert stats.per_position_acceptance() == pytest.approx([0.5, 0.5, 1, 1, 1, 0])


def test_empty_and_plain_traces():
    empty = Stats(draft_len=3)
    assert empty.steps == 0 and empty.tau == 0.0
    assert empty.histogram() == [0, 0, 0, 0]
    assert empty.per_position_acceptance() == [0.0, 0.0, 0.0]
    assert Stats().histogram() == [0] and Stats().per_position_acceptance() == []
    plain = make(trace=[(0, 0, 1)] * 7, draft_len=0, new_tokens=8)
    assert plain.tau == 1.0 and plain.histogram() == [7] and plain.per_position_acceptance() == []


def test_speed_numbers():
    stats = make(new_tokens=18, ttft=0.5, total=2.0)
    assert stats.tokens_per_s == pytest.approx(9.0)
    assert stats.mean_ttft_s == pytest.approx(0.5)
    assert Stats().tokens_per_s == 0.0


def test_merge_pools_traces():
    a = make()
    b = make(trace=[(2, 2, 3), (2, 0, 1)], draft_len=2, new_tokens=5, ttft=0.25, total=1.0)
    b.draft_s, b.verify_s, a.draft_s, a.verify_s = 0.1, 0.2, 0.3, 0.4
    merged = a.merge(b)
    assert merged.draft_len == 4 and merged.runs == 2
    assert merged.proposed == [p for p, _, _ in TRACE] + [2, 2]
    assert merged.accepted == [x for _, x, _ in TRACE] + [2, 0]
    assert merged.emitted == [e for _, _, e in TRACE] + [3, 1]
    assert merged.new_tokens == 23
    # pooled, not the mean of the two taus (17/6 and 2)
    assert merged.tau == pytest.approx((17 + 4) / 8)
    assert merged.histogram() == [2, 1, 3, 0, 2]
    assert merged.per_position_acceptance() == pytest.approx([6 / 8, 5 / 8, 2 / 5, 2 / 5])
    assert merged.total_s == pytest.approx(3.0) and merged.ttft_s == pytest.approx(0.75)
    assert merged.mean_ttft_s == pytest.approx(0.375)
    assert merged.draft_s == pytest.approx(0.4) and merged.verify_s == pytest.approx(0.6)
    assert merged.tokens_per_s == pytest.approx(23 / 3)
    # the inputs are left as they were
    assert a.steps == 6 and b.steps == 2 and a.runs == b.runs == 1


def test_to_dict_and_summary():
    stats = make()
    data = stats.to_dict()
    assert data["steps"] == 6 and data["tau"] == pytest.approx(17 / 6)
    assert data["histogram"] == [1, 1, 2, 0, 2]
    assert data["per_position_acceptance"] == pytest.approx([5 / 6, 4 / 6, 2 / 5, 2 / 5])
    assert data["new_tokens"] == 18 and data["tokens_per_s"] == pytest.approx(9.0)
    summary = stats.summary()
    assert "18 tokens" in summary and "tau 2.83" in summary and "6 steps" in summary
