"""Continuous batching: many generations take their steps together, one target forward per step
(docs/design.md, 'Batched decoding').

A Batch holds the generations in flight on one target, each begun by its own engine (so each
has its own sampling, draft settings, seed and length-rule state). step() plans every
generation's next step (drafting and sizing it as it would alone), runs all their rows in one
forward_many, then verifies and commits each. Generations join between steps (begin() has
prefilled them alone) and leave when they end: that is the scheduler.

Each generation's tokens are those it would get alone: its rows are computed bit-identically
whatever else shares the forward (a backend that `takes_batches` with row-invariant kernels;
elsewhere the rows run one sequence after another), and everything it decides reads its own
state. Knows nothing of HTTP, text or threads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from diffdraft.draft_length import CostCurve
from diffdraft.engine import Emitted, Generation
from diffdraft.errors import DiffdraftError
from diffdraft.target import TargetBackend


# The default batch size is the fewest requests whose step reaches this share of the best throughput (rows
# per second) that the measured cost curve shows: more would add latency to every request for little.
BATCH_THROUGHPUT_SHARE = 0.9
MAX_AUTO_BATCH = 16  # rows measured for that choice


def default_max_batch(costs: CostCurve, share: float = BATCH_THROUGHPUT_SHARE) -> int:
    """The fewest sequences B (one row each) whose forward c(B) reaches `share` of the best B / c(B) within the
    measured curve."""
    rates = [b / costs.target(b) for b in range(1, len(costs.target_s) + 1)]
    best = max(rates)
    return next(b for b, rate in enumerate(rates, start=1) if rate >= share * best)


@dataclass
class Member:
    """A generation in the batch, with what its owner asked: when to stop early, and where its tokens go."""

    generation: Generation
    should_stop: Callable[[], str | None] | None = None
    key: object = None  # the owner's handle for it (a job, an index)


@dataclass
class StepReport:
    """What one batch step did: the emissions, in member order, the members that ended, and its size."""

    emitted: list[tuple[Member, Emitted]] = field(default_factory=list)
    ended: list[Member] = field(default_factory=list)
    sequences: int = 0  # generations in the step's forward
    rows: int = 0  # rows in it
    forward_s: float = 0.0


class Batch:
    """The generations in flight on one target (see the module docstring)."""

    def __init__(self, target: TargetBackend, max_batch: int, memory_limit: int | None = None):
        """memory_limit: the most bytes of KV cache the members may reserve together (None: no limit)."""
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise DiffdraftError(f"the batch size must be a positive integer, got {max_batch!r}")
        if memory_limit is not None and (isinstance(memory_limit, bool) or not isinstance(memory_limit, int)
                                         or memory_limit < 1):
            raise DiffdraftError(f"the KV memory limit must be a positive number of bytes, got {memory_limit!r}")
        self.target = target
        self.max_batch = max_batch
        self.memory_limit = memory_limit
        self.members: list[Member] = []

    @property
    def full(self) -> bool:
        return len(self.members) >= self.max_batch

    @property
    def reserved(self) -> int:
        """Bytes of KV cache the members reserve (their caches' capacities)."""
        return sum(self.target.kv_bytes(m.generation.request.target.capacity) for m in self.members)

    def ever_fits(self, kv_bytes: int) -> bool:
        """Whether a request that reserves kv_bytes fits the memory limit at all (in an empty batch)."""
        return self.memory_limit is None or kv_bytes <= self.memory_limit

    def has_room(self, kv_bytes: int) -> bool:
        """Whether a request that reserves kv_bytes may join now: a free place, and memory within the limit."""
        return not self.full and (self.memory_limit is None or self.reserved + kv_bytes <= self.memory_limit)

    def __len__(self) -> int:
        return len(self.members)

    def add(self, generation: Generation, should_stop: Callable[[], str | None] | None = None,
            key: object = None) -> Member:
        """Admit a begun generation (engine.begin); it takes its first step with the batch's next one."""
        if self.full:
            raise DiffdraftError(f"the batch is full ({self.max_batch} generations)")
        need = self.target.kv_bytes(generation.request.target.capacity)
        if not self.has_room(need):
            raise DiffdraftError(f"the batch's KV memory is full: {self.reserved + need} bytes asked, the limit is "
                                 f"{self.memory_limit}")
        if generation.engine.target is not self.target:
            raise ValueError("a generation joins the batch of its own target")
        member = Member(generation, should_stop, key)
        self.members.append(member)
        return member

    def step(self) -> StepReport:
        """One step of every member: plan, one forward over all their rows, conclude. Members that end
        (at planning, or by what this step emitted) leave the batch and are listed in `ended`."""
        report = StepReport()
        planned = []
        sequences = len(self.members)  # the length rule prices each request's rows as its share of the step
        for member in list(self.members):
            generation = member.generation
            step = generation.engine.plan(generation, member.should_stop, sequences)
            if step is None:
                self._retire(member, report)
            else:
                planned.append((member, step))
        if not planned:
            return report
        want_taps = any(member.generation.want_taps for member, _ in planned)
        tick = time.perf_counter()
        outputs = self.target.forward_many([step.part for _, step in planned], want_taps=want_taps)
        report.forward_s = time.perf_counter() - tick
        report.sequences, report.rows = len(planned), sum(step.part.ids.shape[0] for _, step in planned)
        for (member, step), out in zip(planned, outputs):
            generation = member.generation
            if not generation.want_taps:
                out.taps = None  # another member's drafter asked for them, not this one's
            report.emitted.append((member, generation.engine.conclude(generation, step, out)))
            if generation.stop_reason is not None:
                self._retire(member, report)
        return report

    def cancel(self, member: Member, reason: str = "cancelled") -> None:
        """End a member now (its rows and cache go with it)."""
        if member in self.members:
            member.generation.stop_reason = member.generation.stop_reason or reason
            self.members.remove(member)

    def _retire(self, member: Member, report: StepReport) -> None:
        self.members.remove(member)
        report.ended.append(member)


def run_batched(target: TargetBackend, begins: list[Callable[[], Generation]], max_batch: int,
                arrivals: list[int] | None = None, stops: list[Callable[[], str | None] | None] | None = None,
                on_step: Callable[[StepReport], None] | None = None
                ) -> Iterator[tuple[int, Emitted | None, Generation]]:
    """Run generations through one Batch: begins[i]() begins request i when it is admitted, at the step
    arrivals[i] (default 0) or later, in index order, while the batch has room; stops[i], asked before
    each of its steps, ends it early with the reason it returns. Yields (i, emission, generation) for
    every emission (the prefill's first, then each step's) and (i, None, generation) when request i
    ends; on_step sees each step's report first. The caller may stop early by closing the generator."""
    arrivals = arrivals if arrivals is not None else [0] * len(begins)
    stops = stops if stops is not None else [None] * len(begins)
    if len(arrivals) != len(begins) or len(stops) != len(begins):
        raise ValueError("one arrival step and one stop test per request")
    batch = Batch(target, max_batch)
    waiting = sorted(range(len(begins)), key=lambda i: (arrivals[i], i))
    step_index = 0
    while waiting or batch.members:
        while waiting and arrivals[waiting[0]] <= step_index and not batch.full:
            index = waiting.pop(0)
            generation = begins[index]()
            yield index, generation.first, generation
            if generation.stop_reason is not None:  # ended at its first token
                yield index, None, generation
            else:
                batch.add(generation, stops[index], key=index)
        report = batch.step()
        if on_step is not None:
            on_step(report)
        for member, emitted in report.emitted:
            yield member.key, emitted, member.generation
        for member in report.ended:
            yield member.key, None, member.generation
        step_index += 1
