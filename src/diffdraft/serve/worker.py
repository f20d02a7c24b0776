"""Generation workers off the event loop, fed by a bounded queue.

Two kinds. Worker answers requests on worker threads, one request per thread at a time
(each request's decoding state is its own, so several threads may share the loaded weights).
BatchWorker runs every admitted request on one thread, all of them in each step's one
target forward (continuous batching, diffdraft.batching), up to a maximum batch. With
`on_caller`, one loop runs on the thread that calls `run_here` instead of a thread of its own:
`serve.run` gives it the thread that loaded the model, so that torch's thread pool serves one
thread only (docs/design.md, "Serving"). Requests wait in a queue of fixed size: `submit` refuses when it
is full (the server answers 429). Each job reports back to the event loop through an asyncio
queue: "started", then "text" deltas (stop strings already applied) each with the log
probabilities of the tokens that arrived since the last one (when asked for), then "done" with the
answer and any log probabilities not yet sent, or "error". A job ends early, at the next decoding step, when its client goes away
(`cancel`), when its deadline passes, or when a stop string appears. Knows nothing of HTTP;
errors are ApiErrors for the app.
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field

from diffdraft.api import Answer, TextStreamer
from diffdraft.config import DraftConfig
from diffdraft.errors import DiffdraftError
from diffdraft.serve.metrics import Metrics
from diffdraft.serve.protocol import ApiError, GenerationRequest, bad_request
from diffdraft.serve.stops import StopMatcher


@dataclass
class Job:
    request: GenerationRequest
    ids: list[int]
    max_tokens: int
    seed: int
    deadline: float  # time.monotonic() after which generation stops
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)

    def admissible(self) -> bool:
        """Whether the job should start now: not when its client left while it waited, nor past its deadline
        (then it answers 503)."""
        if self.cancel.is_set():
            return False
        if time.monotonic() > self.deadline:
            self.emit("error", ApiError(503, "the request waited in the queue past its deadline; try again later",
                                        type="server_error", code="timeout"))
            return False
        return True

    def emit(self, kind: str, value=None) -> None:
        """Hand an event to the request's coroutine (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: the server is shutting down
            pass


class _Loops:
    """The queue and the loops that take jobs from it: `count` loops, each on a thread of its own, or one of
    them on the caller's thread (`on_caller`, run by run_here). close() ends every loop once its work is done."""

    def __init__(self, metrics: Metrics, queue_limit: int, count: int, on_caller: bool, name: str):
        if queue_limit < 1:
            raise DiffdraftError(f"the queue limit must be at least 1, got {queue_limit}")
        self.metrics = metrics
        self.waiting: queue.Queue[Job | None] = queue.Queue(maxsize=queue_limit)
        self.loops, self.on_caller, self.closed, self._closing = count, on_caller, False, threading.Lock()
        self.threads = [threading.Thread(target=self._loop, name=f"{name}-{i}", daemon=True)
                        for i in range(count - on_caller)]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; queue.Full when the queue is full."""
        self.waiting.put_nowait(job)
        self.metrics.queue(+1)

    def close(self) -> None:
        """Let every loop end after the jobs already queued (once; again does nothing)."""
        with self._closing:
            if self.closed:
                return
            self.closed = True
        for _ in range(self.loops):
            self.waiting.put(None)

    def run_here(self) -> None:
        """Run the caller's loop (on_caller) until close()."""
        if not self.on_caller:
            raise RuntimeError("this worker runs its loops on threads of its own")
        self._loop()

    def _loop(self) -> None:
        raise NotImplementedError


class Worker(_Loops):
    """`threads` loops that each run jobs one after another through `pipeline.generate_ids`."""

    def __init__(self, pipeline, draft: DraftConfig | None, metrics: Metrics, queue_limit: int, threads: int = 1,
                 on_caller: bool = False):
        if threads < 1:
            raise DiffdraftError(f"the server needs at least 1 worker, got {threads}")
        self.pipeline, self.draft = pipeline, draft
        super().__init__(metrics, queue_limit, threads, on_caller, "diffdraft-worker")

    def _loop(self) -> None:
        while (job := self.waiting.get()) is not None:
            try:
                self._run(job)
            finally:
                self.metrics.queue(-1)

    def _run(self, job: Job) -> None:
        if not job.admissible():
            return
        run = JobRun(job, self.metrics)
        try:
            answer: Answer = self.pipeline.generate_ids(
                job.ids, job.max_tokens, job.request.sampling, self.draft, job.seed, on_text=run.on_text,
                should_stop=run.should_stop, logprobs=job.request.logprobs, on_logprobs=run.on_logprobs)
        except Exception as err:  # noqa: BLE001 - JobRun.fail tells a refusal from a bug
            run.fail(err)
            return
        run.finish(answer)


class JobRun:
    """One job's output while it generates: stop strings, log probabilities waiting for their text, and the
    events "text", "done" or "error" (see the module docstring)."""

    def __init__(self, job: Job, metrics: Metrics):
        self.job, self.metrics = job, metrics
        self.stops = StopMatcher(job.request.stops)
        self.pending: list = []  # log probabilities of tokens whose text has not gone out yet
        self.on_logprobs = self.pending.extend if job.request.logprobs is not None else None
        job.emit("started")

    def taken(self) -> list:
        entries = self.pending[:]
        self.pending.clear()
        return entries

    def on_text(self, delta: str) -> None:
        shown = self.stops.feed(delta)
        if shown:
            self.job.emit("text", (shown, self.taken()))

    def should_stop(self) -> str | None:
        if self.stops.hit:
            return "stop"
        if self.job.cancel.is_set():
            return "cancelled"
        if time.monotonic() > self.job.deadline:
            return "deadline"
        return None

    def finish(self, answer: Answer) -> None:
        tail = self.stops.flush()
        if tail:
            self.job.emit("text", (tail, self.taken()))
        self.metrics.generation(answer.prompt_tokens, answer.stats)
        self.job.emit("done", (answer, "stop" if self.stops.hit else answer.stop_reason, self.taken()))

    def fail(self, err: Exception) -> None:
        """A refusal (DiffdraftError) answers 400 with its message; anything else is a bug, logged here and
        answered 500 without its details."""
        if isinstance(err, DiffdraftError):
            self.job.emit("error", bad_request(err))
            return
        traceback.print_exception(err, file=sys.stderr)
        self.job.emit("error", ApiError(500, "the server failed while generating; see its log", type="server_error",
                                        code="internal_error"))


class BatchWorker(_Loops):
    """One loop that steps every running request together (diffdraft.batching): at each step boundary it
    admits waiting jobs up to `max_batch`, and while their KV caches fit `memory_limit` bytes together (a job
    that could never fit answers 503; one that fits later waits), then runs one batch step, one target
    forward for all of them. Same queue, events and endings as Worker; each answer is what it would be alone."""

    def __init__(self, pipeline, draft: DraftConfig | None, metrics: Metrics, queue_limit: int, max_batch: int,
                 memory_limit: int | None = None, on_caller: bool = False):
        self.pipeline, self.draft = pipeline, draft
        self.batch = pipeline.batch(max_batch, memory_limit)
        super().__init__(metrics, queue_limit, 1, on_caller, "diffdraft-batch")

    def _loop(self) -> None:
        closing = False
        held: Job | None = None  # the next job in line, taken from the queue, waiting for KV memory to free
        while True:
            while not closing or held is not None:  # admit while the batch has room
                if held is None:
                    if self.batch.full:
                        break
                    try:  # wait for work only when there is nothing to step
                        held = self.waiting.get(block=not len(self.batch))
                    except queue.Empty:
                        break
                    if held is None:
                        closing = True
                        break
                if not self._admit(held):
                    break  # its KV cache does not fit beside the running requests: step until some end
                held = None
            if len(self.batch):
                self._step()
            elif closing and held is None:
                return

    def _admit(self, job: Job) -> bool:
        """Prefill a job and put it in the batch, or end it here (refused, cancelled, or done at once): True;
        False when its KV cache does not fit beside the running requests yet."""
        if not job.admissible():
            self.metrics.queue(-1)
            return True
        need = self.pipeline.kv_bytes(job.ids, job.max_tokens, self.draft)
        if not self.batch.ever_fits(need):
            job.emit("error", ApiError(
                503, f"the request needs {need / 2**20:.0f} MiB of KV cache and this server's limit is "
                     f"{self.batch.memory_limit / 2**20:.0f} MiB: ask for fewer tokens", type="server_error",
                code="kv_memory_limit"))
            self.metrics.queue(-1)
            return True
        if not self.batch.has_room(need):
            return False
        run = JobRun(job, self.metrics)
        try:
            generation = self.pipeline.begin_ids(job.ids, job.max_tokens, job.request.sampling, self.draft, job.seed,
                                                 logprobs=job.request.logprobs)
        except Exception as err:  # noqa: BLE001 - JobRun.fail tells a refusal from a bug
            run.fail(err)
            self.metrics.queue(-1)
            return True
        streamer = TextStreamer(self.pipeline.target, run.on_text)
        generation.deliver(generation.first, streamer, run.on_logprobs)
        member = self.batch.add(generation, run.should_stop, key=(run, streamer))
        if generation.stop_reason is not None:  # its first token ended it
            self.batch.cancel(member)
            self._end(member.generation, run, streamer)
        return True

    def _step(self) -> None:
        try:
            report = self.batch.step()
        except Exception as err:  # noqa: BLE001 - a bug: every request in the step fails alike, the server goes on
            for member in list(self.batch.members):
                self.batch.cancel(member, "failed")
                run, _ = member.key
                run.fail(err if not isinstance(err, DiffdraftError) else RuntimeError(str(err)))
                self.metrics.queue(-1)
            return
        self.metrics.batch_step(report.sequences, report.rows)
        for member, emitted in report.emitted:
            run, streamer = member.key
            member.generation.deliver(emitted, streamer, run.on_logprobs)
        for member in report.ended:
            run, streamer = member.key
            self._end(member.generation, run, streamer)

    def _end(self, generation, run: JobRun, streamer: TextStreamer) -> None:
        answer = self.pipeline.answer_of(generation)
        streamer.finish(answer.text)
        run.finish(answer)
        self.metrics.queue(-1)
