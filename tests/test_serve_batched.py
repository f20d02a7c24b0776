"""`diffdraft serve --max-batch N` on the tiny model: concurrent requests stepped together in one
forward each step answer exactly as they do alone (streamed or not, stop strings, logprobs, seeded
T = 1), a full queue answers 429 and loses nothing, a client that leaves frees its place in the
batch, and what cannot batch is refused in one line."""

from __future__ import annotations

import threading
import time

import pytest

from diffdraft.api import load, load_dllm_pipeline
from diffdraft.cli import main
from diffdraft.errors import DiffdraftError
from test_serve import Running, body, chat, stream_then_leave, streamed_text

PROMPTS = ["Tell me about rivers.", "Name the brightest stars and how far away they are.", "abc", "Why is the sea salty?",
           "List three prime numbers.", "Say hello."]
MAX_TOKENS = 30


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load(tiny_model_dir, drafter="ngram", threads=1)


class GatedBatches:
    """The real pipeline whose batch waits at a gate before each step (so requests pile up and join one
    batch), slowed per step (so a disconnect lands mid-answer), recording each answer and step size."""

    def __init__(self, pipe, step_s: float = 0.0):
        self.pipe, self.target, self.describe, self.offers_logprobs = pipe, pipe.target, "gated", True
        self.gate = threading.Event()
        self.gate.set()
        self.step_s, self.answers, self.sizes = step_s, [], []

    def __getattr__(self, name):  # prompt_ids, decoder, begin_ids: the pipeline's own
        return getattr(self.pipe, name)

    def batch(self, max_batch, memory_limit=None):
        batch = self.pipe.batch(max_batch, memory_limit)
        step = batch.step

        def gated_step():
            self.gate.wait()
            time.sleep(self.step_s)
            self.sizes.append(len(batch))
            return step()

        batch.step = gated_step
        return batch

    def answer_of(self, generation):
        answer = self.pipe.answer_of(generation)
        self.answers.append(answer)
        return answer


def test_batched_requests_answer_as_they_do_alone(pipe):
    cases = [dict(messages=[{"role": "user", "content": p}], stream=i % 2 == 1) for i, p in enumerate(PROMPTS)]
    cases[2]["stop"] = ["e"]
    cases[3].update(temperature=1.0, seed=7)
    cases[4].update(logprobs=True, top_logprobs=2)
    alone = [None] * len(cases)  # each request on a server that answers one at a time
    unbatched = Running(pipe, max_batch=1)
    try:
        for i, case in enumerate(cases):
            alone[i] = chat(unbatched.client(), max_tokens=MAX_TOKENS, **{**case, "stream": False})
    finally:
        unbatched.close()
    gated = GatedBatches(pipe)
    gated.gate.clear()
    running = Running(gated, max_batch=4, queue_limit=8)
    try:
        results = [None] * len(cases)

        def send(i):
            reply = chat(running.client(), max_tokens=MAX_TOKENS, **cases[i])
            results[i] = streamed_text(reply)[0] if cases[i]["stream"] else reply

        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(cases))]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while running.app.state.metrics.queue_depth < len(cases):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gated.gate.set()
        for thread in threads:
            thread.join(60)
        for i, (case, reply, reference) in enumerate(zip(cases, results, alone)):
            expected = reference.choices[0].message.content
            assert (reply if case["stream"] else reply.choices[0].message.content) == expected, f"request {i}"
        assert results[4].choices[0].logprobs.content == alone[4].choices[0].logprobs.content
        assert max(gated.sizes) == 4  # requests really shared steps
        metrics = running.raw("GET", "/metrics")[2]
        size = float(next(line.split()[1] for line in metrics.splitlines() if line.startswith("diffdraft_batch_size ")))
        assert size > 1
    finally:
        gated.gate.set()
        running.close()


def test_a_full_queue_answers_429_and_loses_nothing(pipe):
    gated = GatedBatches(pipe)
    gated.gate.clear()
    running = Running(gated, queue_limit=1, max_batch=2)
    try:
        results = {}

        def send(name):
            results[name] = running.raw("POST", "/v1/chat/completions", body())

        threads = []
        while not running.app.state.worker.waiting.full():  # the batch takes one or two, then the queue fills
            assert len(threads) < 3
            threads.append(threading.Thread(target=send, args=(len(threads),)))
            threads[-1].start()
            deadline = time.monotonic() + 30
            while running.app.state.metrics.queue_depth < len(threads):
                assert time.monotonic() < deadline
                time.sleep(0.01)
            time.sleep(0.1)  # time for the worker to admit it, if the batch has room
        status, headers, answer = running.raw("POST", "/v1/chat/completions", body())  # the queue is full
        assert status == 429 and answer["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
        gated.gate.set()
        for thread in threads:
            thread.join(60)
        assert [status for status, _, _ in results.values()] == [200] * len(threads)
        assert running.raw("POST", "/v1/chat/completions", body())[0] == 200
    finally:
        gated.gate.set()
        running.close()


def test_a_disconnect_mid_stream_frees_its_place_in_the_batch(pipe):
    gated = GatedBatches(pipe, step_s=0.02)
    running = Running(gated, max_batch=2)
    try:
        stream_then_leave(running, max_tokens=200)
        deadline = time.monotonic() + 10
        while not gated.answers:
            assert time.monotonic() < deadline, "the cancelled request stayed in the batch"
            time.sleep(0.01)
        first = gated.answers[0]
        assert first.stop_reason == "cancelled" and len(first.tokens) < 200
        assert running.raw("POST", "/v1/chat/completions", body(max_tokens=4))[0] == 200
    finally:
        running.close()


def test_what_cannot_batch_is_refused_in_one_line(tiny_model_dir, capsys):
    dllm = load_dllm_pipeline(tiny_model_dir, dllm="base", block_size=4)
    with pytest.raises(DiffdraftError, match="does not batch requests: serve it with --max-batch 1"):
        Running(dllm, max_batch=2)
    with pytest.raises(DiffdraftError, match="not both"):
        Running(dllm, max_batch=2, workers=2)
    assert main(["serve", "--model", tiny_model_dir, "--max-batch", "2", "--workers", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "give --workers or --max-batch, not both" in err
    assert main(["serve", "--model", tiny_model_dir, "--max-batch", "0"]) == 2


def test_the_kv_memory_limit_queues_or_refuses_cleanly(pipe):
    """With room for one request's KV cache, two requests are answered one after the other (the second waits
    for memory, not for a place in the batch), and a request that could never fit answers 503."""
    ids = pipe.prompt_ids(PROMPTS[0])
    one = pipe.kv_bytes(ids, MAX_TOKENS)
    gated = GatedBatches(pipe)
    gated.gate.clear()
    running = Running(gated, max_batch=4, kv_memory_bytes=one + one // 2)
    try:
        results = []

        def send():
            results.append(chat(running.client(), max_tokens=MAX_TOKENS,
                                messages=[{"role": "user", "content": PROMPTS[0]}]))

        threads = [threading.Thread(target=send) for _ in range(2)]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while running.app.state.metrics.queue_depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        gated.gate.set()
        for thread in threads:
            thread.join(60)
        assert len(results) == 2 and results[0].choices[0].message.content == results[1].choices[0].message.content
        assert max(gated.sizes) == 1  # never two in a batch: their caches would not fit together
        status, _, answer = running.raw("POST", "/v1/chat/completions", body(max_tokens=4 * MAX_TOKENS))
        assert status == 503 and answer["error"]["code"] == "kv_memory_limit"
        assert "ask for fewer tokens" in answer["error"]["message"]
    finally:
        gated.gate.set()
        running.close()
