"""Generation workers off the event loop, fed by a bounded queue.

The loaded pipeline answers requests on worker threads, one request per thread at a time
(one thread by default; each request's decoding state is its own, so several threads may
share the loaded weights). Requests wait in a queue of fixed size: `submit` refuses when it
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

from diffdraft.api import Answer
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

    def emit(self, kind: str, value=None) -> None:
        """Hand an event to the request's coroutine (from the worker thread)."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the event loop is gone: the server is shutting down
            pass


class Worker:
    """`threads` threads that each run jobs one after another through `pipeline.generate_ids`."""

    def __init__(self, pipeline, draft: DraftConfig | None, metrics: Metrics, queue_limit: int, threads: int = 1):
        if queue_limit < 1:
            raise DiffdraftError(f"the queue limit must be at least 1, got {queue_limit}")
        if threads < 1:
            raise DiffdraftError(f"the server needs at least 1 worker, got {threads}")
        self.pipeline, self.draft, self.metrics = pipeline, draft, metrics
        self.waiting: queue.Queue[Job | None] = queue.Queue(maxsize=queue_limit)
        self.threads = [threading.Thread(target=self._loop, name=f"diffdraft-worker-{i}", daemon=True)
                        for i in range(threads)]
        for thread in self.threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job; queue.Full when the queue is full."""
        self.waiting.put_nowait(job)
        self.metrics.queue(+1)

    def close(self) -> None:
        for _ in self.threads:
            self.waiting.put(None)

    def _loop(self) -> None:
        while (job := self.waiting.get()) is not None:
            try:
                self._run(job)
            finally:
                self.metrics.queue(-1)

    def _run(self, job: Job) -> None:
        if job.cancel.is_set():
            return  # its client left while it waited
        if time.monotonic() > job.deadline:
            job.emit("error", ApiError(503, "the request waited in the queue past its deadline; try again later",
                                       type="server_error", code="timeout"))
            return
        job.emit("started")
        stops = StopMatcher(job.request.stops)
        pending: list = []  # log probabilities of tokens whose text has not gone out yet

        def taken() -> list:
            entries = pending[:]
            pending.clear()
            return entries

        def on_text(delta: str) -> None:
            shown = stops.feed(delta)
            if shown:
                job.emit("text", (shown, taken()))

        def should_stop() -> str | None:
            if stops.hit:
                return "stop"
            if job.cancel.is_set():
                return "cancelled"
            if time.monotonic() > job.deadline:
                return "deadline"
            return None

        try:
            answer: Answer = self.pipeline.generate_ids(
                job.ids, job.max_tokens, job.request.sampling, self.draft, job.seed, on_text=on_text,
                should_stop=should_stop, logprobs=job.request.logprobs,
                on_logprobs=pending.extend if job.request.logprobs is not None else None)
        except DiffdraftError as err:
            job.emit("error", bad_request(err))
            return
        except Exception:  # a bug: logged here, never sent to the client
            traceback.print_exc(file=sys.stderr)
            job.emit("error", ApiError(500, "the server failed while generating; see its log", type="server_error",
                                       code="internal_error"))
            return
        tail = stops.flush()
        if tail:
            job.emit("text", (tail, taken()))
        self.metrics.generation(answer.prompt_tokens, answer.stats)
        job.emit("done", (answer, "stop" if stops.hit else answer.stop_reason, taken()))
