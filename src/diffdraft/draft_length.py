"""How many drafted tokens to verify: the cost-aware length rule of docs/design.md, 'How many tokens to verify'.

A step that verifies k drafted tokens emits 1 + A_k tokens and costs d(n) + c(k + 1): the
drafter's time for the n tokens it was asked for and the target's forward over k + 1 tokens.
With a_i the probability that slot i is accepted once the slots before it were,
E[A_k] = sum_{i<=k} prod_{j<=i} a_j, and the rule verifies the k that maximizes
(1 + E[A_k]) / (d(n) + c(k + 1)). Where a drafter call costs more for more slots (a block
drafter that runs only the rows asked for), `LengthPolicy.proposal` first sizes n the same way
from each slot's acceptance so far, before any confidence is known.

- `CostCurve` holds c(1..K) and d, measured on this machine (diffdraft.costs measures and
  caches them).
- `AcceptanceCalibration` turns a drafter's per-slot confidence into a_i, learned online
  from the acceptance actually observed, per slot and confidence bucket, starting from the
  confidence itself.
- `LengthPolicy` makes the choice. It reads only what is known before verification (the
  drafter's confidences and past steps), never the target's logits of this step, so the
  output law is untouched: the choice is lossless for any verifier.
- `DraftingValue` decides whether to call the drafter at all: where a request's drafting
  steps have lately emitted fewer tokens per second (by the cost curve) than plain steps
  would, the step skips the drafter and runs as plain decoding, drafting again every
  PROBE_EVERY-th step to notice when it pays again. So the default does not run far below
  plain decoding on a machine where verifying rows is dear (4-bit weights on a CPU) or a
  text the drafter cannot guess. It is kept per request, so that what ran before on a
  server does not change which steps a seeded request drafts.

Pure arithmetic on floats and small tensors; knows nothing of models.
"""

from __future__ import annotations

import functools
import math
import threading
from dataclasses import dataclass, field

import torch

BUCKETS = 10  # confidence buckets of width 0.1
MAX_SLOT = 8  # slots from this one on share one calibration row
PRIOR_WEIGHT = 4.0  # pseudo-observations at the drafter's own confidence
NO_CONFIDENCE = 0.5  # the prior of a drafter that states no confidence (n-gram, say)
# Optimism for little-seen cells: the choice adds EXPLORE / sqrt(1 + times reached) to each a_i, so
# a slot whose confidence looks poor is still tried now and then until its acceptance is known
# (a cell never verified would otherwise never learn that the drafter is better than it says).
EXPLORE = 0.5
# Whether drafting pays is judged on drafting steps of about the last 1 / (1 - VALUE_DECAY) seen;
# while it does not, one step in PROBE_EVERY drafts anyway.
VALUE_DECAY = 0.97
PROBE_EVERY = 8


@dataclass(frozen=True)
class CostCurve:
    """Measured costs in seconds: target_s[k-1] = c(k), a target forward over k new tokens
    (k = 1..K); draft_s = d(1), one drafter call for one token, and draft_slot_s what each further token
    asked of the same call adds (0 for a drafter whose call costs the same for any count). Beyond K, c grows
    by the mean step of the curve's upper
    half (the last step alone may be a flat stretch of the kernel's tiles, and a batch's rows reach far
    past K: priced by that step, rows there looked nearly free)."""

    target_s: tuple[float, ...]
    draft_s: float = 0.0
    draft_slot_s: float = 0.0

    def __post_init__(self) -> None:
        if not self.target_s or any(not (c > 0 and math.isfinite(c)) for c in self.target_s):
            raise ValueError(f"target costs must be positive and finite, got {self.target_s}")
        if not (self.draft_s >= 0 and math.isfinite(self.draft_s)):
            raise ValueError(f"the drafter cost must be >= 0, got {self.draft_s}")
        if not (self.draft_slot_s >= 0 and math.isfinite(self.draft_slot_s)):
            raise ValueError(f"the drafter's cost per further token must be >= 0, got {self.draft_slot_s}")

    def draft(self, n: int) -> float:
        """d(n): one drafter call asked for n >= 1 tokens."""
        return self.draft_s + self.draft_slot_s * max(n - 1, 0)

    def target(self, k: int) -> float:
        """c(k) for k >= 1."""
        known = self.target_s
        if k <= len(known):
            return known[k - 1]
        half = len(known) // 2
        slope = (known[-1] - known[half - 1]) / (len(known) - half) if len(known) > 1 else known[-1]
        return known[-1] + max(slope, 0.0) * (k - len(known))

    def longest_useful(self, limit: int) -> int:
        """The longest draft that could ever be chosen: past it, even a draft accepted whole
        emits fewer tokens per second than verifying none of it."""
        best = 0
        for k in range(1, limit + 1):
            if (1 + k) / (self.draft(k) + self.target(k + 1)) >= 1.0 / (self.draft(k) + self.target(1)):
                best = k
        return best

    def in_batch(self, sequences: int) -> "CostCurve":
        """The curve as one request sees it in a step over `sequences` requests with a row each: its share
        of those rows, c(B) / B, plus what its own k - 1 further rows add, c(B + k - 1) - c(B). The same
        curve for B = 1; flatter as B grows on a machine where rows cost more in bulk (docs/design.md,
        'Batched decoding'). The drafter's cost stays whole: each request's drafter runs on its own."""
        return _in_batch(self, sequences) if sequences > 1 else self

    def to_dict(self) -> dict:
        return {"target_ms": [round(c * 1000, 3) for c in self.target_s], "draft_ms": round(self.draft_s * 1000, 3),
                "draft_slot_ms": round(self.draft_slot_s * 1000, 3)}


@functools.lru_cache(maxsize=64)
def _in_batch(curve: CostCurve, sequences: int) -> CostCurve:
    base = curve.target(sequences)
    rows = range(1, len(curve.target_s) + 1)
    return CostCurve(tuple(base / sequences + curve.target(sequences + k - 1) - base for k in rows), curve.draft_s,
                     curve.draft_slot_s)


def _pulled_rate(hits: torch.Tensor, reached: torch.Tensor, prior, explore: float) -> torch.Tensor:
    """(hits + w prior) / (reached + w), w = PRIOR_WEIGHT, raised by explore / sqrt(1 + reached), at most 1."""
    rate = (hits + PRIOR_WEIGHT * prior) / (reached + PRIOR_WEIGHT)
    return (rate + explore / (1 + reached).sqrt()).clamp(max=1.0)


@dataclass
class AcceptanceCalibration:
    """a_i from a drafter's confidence at slot i, learned online.

    Each (slot, bucket) cell keeps how often its slot was reached and accepted; the estimate
    is (hits + w c) / (reached + w), the observed rate pulled towards the confidence c itself
    with the weight w of PRIOR_WEIGHT steps. A slot is reached when every slot before it was
    accepted.
    """

    hits: torch.Tensor = field(default_factory=lambda: torch.zeros(MAX_SLOT, BUCKETS + 1, dtype=torch.float64))
    reached: torch.Tensor = field(default_factory=lambda: torch.zeros(MAX_SLOT, BUCKETS + 1, dtype=torch.float64))

    @staticmethod
    def _cells(confidence: torch.Tensor | None, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(slot rows [n], bucket columns [n], prior [n]); bucket BUCKETS is 'no confidence'."""
        slots = torch.arange(n).clamp(max=MAX_SLOT - 1)
        if confidence is None:
            return slots, torch.full((n,), BUCKETS), torch.full((n,), NO_CONFIDENCE, dtype=torch.float64)
        conf = confidence[:n].double().clamp(0.0, 1.0)
        return slots, (conf * BUCKETS).long().clamp(max=BUCKETS - 1), conf

    def estimate(self, confidence: torch.Tensor | None, n: int, explore: float = 0.0) -> torch.Tensor:
        """a_1..a_n: [n] float64 in [0, 1], raised by explore / sqrt(1 + reached) where asked."""
        slots, buckets, prior = self._cells(confidence, n)
        return _pulled_rate(self.hits[slots, buckets], self.reached[slots, buckets], prior, explore)

    def marginal(self, n: int, explore: float = 0.0) -> torch.Tensor:
        """a_1..a_n whatever the confidence: each slot's rate over all its buckets, pulled towards NO_CONFIDENCE
        as estimate() pulls towards the confidence; [n] float64."""
        slots = torch.arange(n).clamp(max=MAX_SLOT - 1)
        return _pulled_rate(self.hits.sum(dim=1)[slots], self.reached.sum(dim=1)[slots], NO_CONFIDENCE, explore)

    def observe(self, confidence: torch.Tensor | None, verified: int, accepted: int) -> None:
        """A step verified `verified` drafted tokens and accepted the first `accepted` of them."""
        reached = min(accepted + 1, verified)
        if reached <= 0:
            return
        slots, buckets, _ = self._cells(confidence, reached)
        self.reached.index_put_((slots, buckets), torch.ones(reached, dtype=torch.float64), accumulate=True)
        hit = torch.arange(reached) < accepted
        self.hits.index_put_((slots, buckets), hit.double(), accumulate=True)


@dataclass
class DraftingValue:
    """One request's record of whether drafting pays: decayed sums of what its drafting steps emitted and
    what they cost by the curve (d + c(k + 1)), against a plain step's 1 / c(1)."""

    costs: CostCurve
    emitted: float = 0.0
    seconds: float = 0.0
    skipped: int = 0  # steps skipped in a row

    def observe(self, verified: int, accepted: int, costs: CostCurve | None = None, proposed: int = 1) -> None:
        """A drafting step asked the drafter for `proposed` tokens and verified `verified` of them (0: none
        verified); costs: the curve it ran under (a batch's, CostCurve.in_batch), else the request's own."""
        costs = costs or self.costs
        self.emitted = VALUE_DECAY * self.emitted + 1 + accepted
        self.seconds = VALUE_DECAY * self.seconds + costs.draft(proposed) + costs.target(verified + 1)

    def pays(self, costs: CostCurve | None = None) -> bool:
        return self.seconds == 0 or self.emitted / self.seconds >= 1.0 / (costs or self.costs).target(1)

    def draft_now(self, costs: CostCurve | None = None, sequences: int = 1) -> bool:
        """Whether this step calls the drafter: where drafting pays (against a plain step under `costs`), and
        else every PROBE_EVERY-th step, or in a step shared by `sequences` requests every PROBE_EVERY *
        sequences-th: a batch spends about one probe per PROBE_EVERY steps in all, since each probe's drafter
        call delays every request in the step."""
        if self.pays(costs) or self.skipped + 1 >= PROBE_EVERY * max(1, sequences):
            self.skipped = 0
            return True
        self.skipped += 1
        return False


def expected_emitted(acceptance: torch.Tensor) -> torch.Tensor:
    """1 + E[A_k] for k = 0..n from a_1..a_n [n] -> [n + 1]."""
    reach = torch.cumprod(acceptance, dim=0)  # P(the first i slots all accepted)
    return torch.cat([torch.ones(1, dtype=acceptance.dtype), 1 + torch.cumsum(reach, dim=0)])


class LengthPolicy:
    """Chooses k per step from a cost curve and calibrated confidences (module docstring).

    One policy serves one drafter on one target; its calibration is kept per decoding mode
    (greedy or sampled), since acceptance differs between them.
    """

    def __init__(self, costs: CostCurve, explore: float = EXPLORE):
        self.costs = costs
        self.explore = explore
        self._calibration: dict[tuple[bool, str], AcceptanceCalibration] = {}
        self._lock = threading.Lock()  # requests running at once share the calibration

    def calibration(self, greedy: bool, source: str = "drafter") -> AcceptanceCalibration:
        """The calibration of one source of drafts ("drafter", or "lookup": a tree's n-gram branch)."""
        return self._calibration.setdefault((greedy, source), AcceptanceCalibration())

    def longest_useful(self, limit: int, costs: CostCurve | None = None) -> int:
        return (costs or self.costs).longest_useful(limit)

    def new_value(self) -> DraftingValue:
        """A fresh record of whether drafting pays, for one request."""
        return DraftingValue(self.costs)

    def acceptance(self, confidence: torch.Tensor | None, available: int, greedy: bool,
                   source: str = "drafter") -> torch.Tensor:
        """a_1..a_available as the choice sees them, optimistic where little is known: [available] float64."""
        with self._lock:
            return self.calibration(greedy, source).estimate(confidence, available, explore=self.explore)

    def rates(self, confidence: torch.Tensor | None, available: int, greedy: bool,
              costs: CostCurve | None = None) -> torch.Tensor:
        """Expected tokens per second for k = 0..available, optimistic where little is known: [available + 1].
        costs: the curve this step runs under (a batch's), else the policy's own."""
        costs = costs or self.costs
        acceptance = self.acceptance(confidence, available, greedy)
        drafting = costs.draft(available)  # spent: the drafter was asked for `available` tokens
        cost = torch.tensor([drafting + costs.target(k + 1) for k in range(available + 1)], dtype=torch.float64)
        return expected_emitted(acceptance) / cost

    def proposal(self, limit: int, greedy: bool, costs: CostCurve | None = None) -> int:
        """How many tokens (1..limit) to ask the drafter for, before its confidences are known: all `limit` where
        a call costs the same for any count, else the n whose draft, verified whole at each slot's acceptance so
        far (optimistic where little is known), promises the most tokens per second for d(n) + c(n + 1)."""
        costs = costs or self.costs
        if limit <= 1 or costs.draft_slot_s == 0:
            return limit
        with self._lock:
            acceptance = self.calibration(greedy).marginal(limit, explore=self.explore)  # [limit]
        emitted = expected_emitted(acceptance)[1:]  # [limit]: 1 + E[A_n] for n = 1..limit
        cost = torch.tensor([costs.draft(n) + costs.target(n + 1) for n in range(1, limit + 1)], dtype=torch.float64)
        return int((emitted / cost).argmax()) + 1

    def choose(self, confidence: torch.Tensor | None, available: int, greedy: bool,
               costs: CostCurve | None = None) -> int:
        """How many of the `available` drafted tokens to verify (0..available)."""
        if available <= 0:
            return 0
        return int(self.rates(confidence, available, greedy, costs).argmax())

    def observe(self, confidence: torch.Tensor | None, verified: int, accepted: int, greedy: bool,
                source: str = "drafter") -> None:
        """A drafting step verified `verified` drafted tokens and accepted the first `accepted`."""
        with self._lock:
            self.calibration(greedy, source).observe(confidence, verified, accepted)
