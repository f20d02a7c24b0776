"""How many denoising steps SimSD drafts and verifies at once: the length rule of docs/design.md ('How many
tokens to verify') with SimSD's costs.

Verifying S drafted steps costs S drafter steps and one target forward over S + 1 copies of the block
(plus the finished blocks it carries), and reveals 1 + A_S of the target's steps, where a_j, the chance
that drafted step j is accepted once the steps before it were, is learned online
(draft_length.AcceptanceCalibration, without a confidence; a little-seen step gets the rule's optimism,
so an S not chosen for a while is tried again). The budget picks the S in 0..limit with the most
revealed steps per second; S = 0 is the dLLM's own step, so where drafting does not pay, SimSD runs as
the dLLM alone. The costs are measured once, on the lean runtime's target (`measure`).

Used for greedy verification only: above temperature 0 the number of drafted steps decides how many
random numbers are drawn, so a choice that depends on measured times would make a seeded answer depend
on the machine's load; there SimSD keeps its fixed step count. Knows nothing of models beyond timing
the two calls it is given.
"""

from __future__ import annotations

import threading
from typing import Callable

from diffdraft.costs import median_time
from diffdraft.draft_length import EXPLORE, AcceptanceCalibration, CostCurve, expected_emitted

ROUNDS = 5  # timed calls per measured row count (median)


class StepBudget:
    """The choice of S for one dLLM runner, shared by its requests (the calibration learns from all)."""

    def __init__(self, costs: CostCurve, block_size: int):
        self.costs = costs  # c(rows) of a target forward; draft_s: one drafter step
        self.block_size = block_size
        self.calibration = AcceptanceCalibration()
        self._lock = threading.Lock()  # requests on several server threads share it

    def choose(self, limit: int, carried: int) -> int:
        """S in 0..limit for a verification that also carries `carried` finished rows."""
        if limit <= 0:
            return 0
        with self._lock:
            acceptance = self.calibration.estimate(None, limit, explore=EXPLORE)  # [limit]
        emitted = expected_emitted(acceptance)  # [limit + 1]: 1 + E[A_S] for S = 0..limit
        b = self.block_size
        rates = [float(emitted[s]) / (s * self.costs.draft_s + self.costs.target((s + 1) * b + carried))
                 for s in range(limit + 1)]
        return max(range(limit + 1), key=rates.__getitem__)  # ties: the fewest steps

    def observe(self, drafted: int, accepted: int) -> None:
        if drafted > 0:
            with self._lock:
                self.calibration.observe(None, drafted, accepted)

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, **self.costs.to_dict()}


def measure(forward_rows: Callable[[int], None], draft_step: Callable[[], None], block_size: int,
            most_rows: int) -> CostCurve:
    """c(1..most_rows) from timed forwards over multiples of the block size (forward_rows(k) runs one over k
    rows), linear in between and made non-decreasing; d from timed drafter steps. Median of ROUNDS calls,
    after one untimed call each."""
    counts = sorted({block_size * m for m in range(1, -(-most_rows // block_size) + 1)} | {1})
    measured = {k: _median_seconds(lambda k=k: forward_rows(k)) for k in counts}
    curve, best = [], 0.0
    for k in range(1, max(counts) + 1):
        low = max(c for c in counts if c <= k)
        high = min(c for c in counts if c >= k)
        value = measured[low] if high == low else \
            measured[low] + (measured[high] - measured[low]) * (k - low) / (high - low)
        best = max(best, value)
        curve.append(best)
    return CostCurve(tuple(curve), _median_seconds(draft_step))


def _median_seconds(call: Callable[[], None]) -> float:
    call()  # untimed: the first call pays for allocations
    return median_time(call, ROUNDS)
