"""The server's counters and histograms, written in Prometheus' text format for GET /metrics.

Requests by endpoint and status, prompt and completion tokens, verify steps and the tokens
they emitted (tau = emitted / steps), drafted and accepted tokens by draft position
(per-position acceptance = accepted / proposed), queue depth, the batch worker's steps with
their requests and rows (batch size, rows per step), and histograms of request
latency and time to first token. Thread-safe: the worker and the event loop both record.
Knows nothing of HTTP or models.
"""

from __future__ import annotations

import threading
from collections import defaultdict

from diffdraft.stats import Stats

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.total, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        self.total += value
        self.count += 1
        for i, edge in enumerate(self.buckets):
            if value <= edge:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{edge:g}"}} {n}' for edge, n in zip(self.buckets, self.counts)]
        out.append(f'{name}_bucket{{le="+Inf"}} {self.count}')
        out += [f"{name}_sum {self.total:.6f}", f"{name}_count {self.count}"]
        return out


class Metrics:
    def __init__(self):
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, int], int] = defaultdict(int)  # (endpoint, status) -> count
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.steps = 0
        self.emitted = 0
        self.proposed_at: dict[int, int] = defaultdict(int)  # draft position (1-based) -> times drafted
        self.accepted_at: dict[int, int] = defaultdict(int)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.ttft = Histogram(TTFT_BUCKETS)
        self.queue_depth = 0  # requests waiting or running
        self.service_s, self.served = 0.0, 0  # generation time on the worker (no waiting), for Retry-After
        self.batch_steps, self.batch_sequences, self.batch_rows = 0, 0, 0  # the batch worker's steps and their sizes

    def request(self, endpoint: str, status: int, latency_s: float | None = None) -> None:
        with self._lock:
            self.requests[(endpoint, status)] += 1
            if latency_s is not None:
                self.latency.observe(latency_s)

    def first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def generation(self, prompt_tokens: int, stats: Stats) -> None:
        with self._lock:
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += stats.new_tokens
            self.service_s += stats.total_s
            self.served += 1
            self.steps += stats.steps
            self.emitted += sum(stats.emitted)
            for proposed, accepted in zip(stats.proposed, stats.accepted):
                for position in range(1, proposed + 1):
                    self.proposed_at[position] += 1
                    self.accepted_at[position] += position <= accepted

    def batch_step(self, sequences: int, rows: int) -> None:
        """A batched step ran one forward over `rows` rows of `sequences` requests."""
        with self._lock:
            self.batch_steps += 1
            self.batch_sequences += sequences
            self.batch_rows += rows

    def mean_service_s(self) -> float:
        """Mean generation time of a request on the worker so far (1 s before the first)."""
        with self._lock:
            return self.service_s / self.served if self.served else 1.0

    def queue(self, change: int) -> None:
        with self._lock:
            self.queue_depth += change

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP diffdraft_requests_total Requests answered, by endpoint and HTTP status.",
                     "# TYPE diffdraft_requests_total counter"]
            lines += [f'diffdraft_requests_total{{endpoint="{e}",status="{s}"}} {n}'
                      for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP diffdraft_tokens_total Tokens processed, by kind.", "# TYPE diffdraft_tokens_total counter",
                      f'diffdraft_tokens_total{{kind="prompt"}} {self.prompt_tokens}',
                      f'diffdraft_tokens_total{{kind="completion"}} {self.completion_tokens}',
                      "# HELP diffdraft_verify_steps_total Target forwards after the prefill.",
                      "# TYPE diffdraft_verify_steps_total counter", f"diffdraft_verify_steps_total {self.steps}",
                      "# HELP diffdraft_step_tokens_total Tokens emitted by those forwards (bonus included).",
                      "# TYPE diffdraft_step_tokens_total counter", f"diffdraft_step_tokens_total {self.emitted}",
                      "# HELP diffdraft_tau Mean tokens per verify step so far (step_tokens / verify_steps).",
                      "# TYPE diffdraft_tau gauge", f"diffdraft_tau {self.emitted / self.steps if self.steps else 0:.4f}",
                      "# HELP diffdraft_drafted_total Draft tokens verified, by position in the draft.",
                      "# TYPE diffdraft_drafted_total counter"]
            lines += [f'diffdraft_drafted_total{{position="{p}"}} {n}' for p, n in sorted(self.proposed_at.items())]
            lines += ["# HELP diffdraft_accepted_total Draft tokens accepted, by position in the draft.",
                      "# TYPE diffdraft_accepted_total counter"]
            lines += [f'diffdraft_accepted_total{{position="{p}"}} {self.accepted_at[p]}'
                      for p in sorted(self.proposed_at)]
            lines += ["# HELP diffdraft_acceptance Accepted / drafted, by position in the draft.",
                      "# TYPE diffdraft_acceptance gauge"]
            lines += [f'diffdraft_acceptance{{position="{p}"}} {self.accepted_at[p] / n:.4f}'
                      for p, n in sorted(self.proposed_at.items())]
            lines += ["# HELP diffdraft_queue_depth Requests waiting or running.", "# TYPE diffdraft_queue_depth gauge",
                      f"diffdraft_queue_depth {self.queue_depth}",
                      "# HELP diffdraft_batch_steps_total Batched steps (one target forward each).",
                      "# TYPE diffdraft_batch_steps_total counter", f"diffdraft_batch_steps_total {self.batch_steps}",
                      "# HELP diffdraft_batch_sequences_total Requests stepped, summed over batched steps.",
                      "# TYPE diffdraft_batch_sequences_total counter",
                      f"diffdraft_batch_sequences_total {self.batch_sequences}",
                      "# HELP diffdraft_batch_rows_total Rows in the batched steps' forwards (drafts included).",
                      "# TYPE diffdraft_batch_rows_total counter", f"diffdraft_batch_rows_total {self.batch_rows}",
                      "# HELP diffdraft_batch_size Mean requests per batched step so far.",
                      "# TYPE diffdraft_batch_size gauge",
                      f"diffdraft_batch_size {self.batch_sequences / self.batch_steps if self.batch_steps else 0:.4f}",
                      "# HELP diffdraft_batch_rows_per_step Mean rows per batched step so far.",
                      "# TYPE diffdraft_batch_rows_per_step gauge",
                      f"diffdraft_batch_rows_per_step {self.batch_rows / self.batch_steps if self.batch_steps else 0:.4f}",
                      "# HELP diffdraft_request_latency_seconds Time from request to last byte.",
                      "# TYPE diffdraft_request_latency_seconds histogram",
                      *self.latency.lines("diffdraft_request_latency_seconds"),
                      "# HELP diffdraft_time_to_first_token_seconds Time from request to the first text.",
                      "# TYPE diffdraft_time_to_first_token_seconds histogram",
                      *self.ttft.lines("diffdraft_time_to_first_token_seconds")]
            return "\n".join(lines) + "\n"
