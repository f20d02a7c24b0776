"""`diffdraft serve` on the tiny model: the official openai client, a bad-request matrix, the queue,
disconnects, and the dLLM path.

Each server runs in this process on a free loopback port (uvicorn in a thread) over a
pipeline loaded once per module. Raw requests (invalid JSON, non-UTF-8 bodies) go through
http.client, which sends bytes exactly as given.
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import openai
import pytest
import uvicorn

from diffdraft.api import load, load_dllm_pipeline
from diffdraft.cli import main
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.serve import ServerSettings, create_app

KEY = "test-key"
PROMPT = "Tell me about rivers."


class Running:
    """A server on a free loopback port, stopped by close()."""

    def __init__(self, pipeline, draft: DraftConfig | None = None, **settings):
        settings.setdefault("model_name", "tiny")
        self.app = create_app(pipeline, ServerSettings(**settings), draft)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.02)

    def client(self, key: str = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key, max_retries=0, timeout=60)

    def raw(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None):
        """(status, headers, parsed JSON or text) of one request sent byte for byte."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        conn.request(method, path, body=body, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        data = response.read()
        conn.close()
        try:
            parsed = json.loads(data)
        except ValueError:
            parsed = data.decode("utf-8", "replace")
        return response.status, dict(response.getheaders()), parsed

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def pipe(tiny_model_dir):
    return load(tiny_model_dir, drafter="ngram", threads=1)


@pytest.fixture(scope="module")
def server(pipe):
    running = Running(pipe, api_key=KEY, max_body_bytes=64 * 1024, default_max_tokens=24)
    yield running
    running.close()


def chat(client, **kw):
    kw.setdefault("model", "tiny")
    kw.setdefault("messages", [{"role": "user", "content": PROMPT}])
    kw.setdefault("max_tokens", 24)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(**kw)


def streamed_text(stream) -> tuple[str, list]:
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices and hasattr(c.choices[0], "delta"))
    return text, chunks


def test_chat_equals_the_cli_and_streams_the_same_text(server, pipe, capsys, tiny_model_dir):
    client = server.client()
    answer = chat(client)
    text = answer.choices[0].message.content
    assert main(["generate", PROMPT, "--model", tiny_model_dir, "--drafter", "ngram", "--max-new-tokens", "24",
                 "--threads", "1"]) == 0
    assert capsys.readouterr().out == text + "\n"  # the CLI prints the answer, then a line break

    streamed, chunks = streamed_text(chat(client, stream=True, stream_options={"include_usage": True}))
    assert streamed == text
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [answer.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens


def test_usage_counts_and_the_diffdraft_block(server, pipe):
    answer = chat(server.client())
    reference = pipe.generate(PROMPT, max_new_tokens=24, sampling=SamplingConfig())
    assert answer.usage.prompt_tokens == len(pipe.prompt_ids(PROMPT)) == reference.prompt_tokens
    assert answer.usage.completion_tokens == len(reference.tokens)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    block = answer.model_extra["diffdraft"]
    assert sum(block["tokens_per_step"]) + 1 == answer.usage.completion_tokens  # + the prefill's first token
    assert block["tau"] == pytest.approx(sum(block["tokens_per_step"]) / block["steps"], abs=1e-3)


def test_completions_stream_and_not(server, pipe):
    client = server.client()
    answer = client.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0)
    reference = pipe.generate("abc", max_new_tokens=16, chat=False)
    assert answer.choices[0].text == reference.text
    assert answer.usage.prompt_tokens == len(pipe.prompt_ids("abc", chat=False))
    stream = client.completions.create(model="tiny", prompt="abc", max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream if c.choices) == reference.text


def test_a_seed_reproduces_sampled_text(server):
    client = server.client()
    texts = {seed: [chat(client, temperature=1.0, seed=seed).choices[0].message.content for _ in range(2)]
             for seed in (1, 2, 3)}
    assert all(a == b for a, b in texts.values())  # same seed, same text
    assert len({a for a, _ in texts.values()}) > 1  # and the seed matters


def test_stop_strings_cut_the_text(server):
    client = server.client()
    full = chat(client, max_tokens=24).choices[0].message.content
    stop = full[6:8]
    cut = full[: full.index(stop)]
    for stream in (False, True):
        if stream:
            text, chunks = streamed_text(chat(client, stop=[stop, "never-there"], stream=True))
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            answer = chat(client, stop=stop)
            text, finish = answer.choices[0].message.content, [answer.choices[0].finish_reason]
        assert text == cut and finish == ["stop"]


def test_models_health_and_metrics(pipe):
    """With fixed-length drafting, so that drafts are verified whatever this machine's costs say."""
    server = Running(pipe, draft=DraftConfig(draft_len=4, length="fixed"), api_key=KEY)
    try:
        check_models_health_and_metrics(server)
    finally:
        server.close()


def check_models_health_and_metrics(server):
    assert [m.id for m in server.client().models.list()] == ["tiny"]
    status, _, body = server.raw("GET", "/health")  # open without the key
    assert status == 200 and body["status"] == "ok"
    chat(server.client())
    status, _, refused = server.raw("GET", "/metrics")  # behind the key, as /v1 is
    assert status == 401 and refused["error"]["code"] == "invalid_api_key"
    status, headers, text = server.raw("GET", "/metrics", headers=AUTH)
    assert status == 200 and headers["content-type"].startswith("text/plain")
    for needle in ('diffdraft_requests_total{endpoint="/v1/chat/completions",status="200"}', "diffdraft_tau ",
                   'diffdraft_acceptance{position="1"}', "diffdraft_queue_depth 0",
                   "diffdraft_request_latency_seconds_bucket", "diffdraft_time_to_first_token_seconds_count",
                   'diffdraft_tokens_total{kind="completion"}'):
        assert needle in text


GOOD = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 8, "temperature": 0}
AUTH = {"Authorization": f"Bearer {KEY}"}


def body(**changes) -> bytes:
    data = {**GOOD, **changes}
    return json.dumps({k: v for k, v in data.items() if v is not ...}).encode()


BAD_REQUESTS = [
    ("invalid JSON", "/v1/chat/completions", b'{"model": "tiny", "messages": [', AUTH, 400, None),
    ("not an object", "/v1/chat/completions", b"[1, 2]", AUTH, 400, None),
    ("missing messages", "/v1/chat/completions", body(messages=...), AUTH, 422, "messages"),
    ("empty messages", "/v1/chat/completions", body(messages=[]), AUTH, 400, "messages"),
    ("messages of the wrong type", "/v1/chat/completions", body(messages="hello"), AUTH, 422, "messages"),
    ("temperature as a string", "/v1/chat/completions", body(temperature="0.5"), AUTH, 422, "temperature"),
    ("max_tokens as a float", "/v1/chat/completions", body(max_tokens=1.5), AUTH, 422, "max_tokens"),
    ("stream as a string", "/v1/chat/completions", body(stream="yes"), AUTH, 422, "stream"),
    ("temperature -1", "/v1/chat/completions", body(temperature=-1), AUTH, 400, "temperature"),
    ("top_p 0", "/v1/chat/completions", body(top_p=0), AUTH, 400, "top_p"),
    ("max_tokens 0", "/v1/chat/completions", body(max_tokens=0), AUTH, 400, "max_tokens"),
    ("a huge max_tokens", "/v1/chat/completions", body(max_tokens=10**7), AUTH, 400, "max_tokens"),
    ("n=2", "/v1/chat/completions", body(n=2), AUTH, 400, "n"),
    ("five stop strings", "/v1/chat/completions", body(stop=list("abcde")), AUTH, 400, "stop"),
    ("an unknown model", "/v1/chat/completions", body(model="gpt-9"), AUTH, 404, "model"),
    ("an unknown role", "/v1/chat/completions", body(messages=[{"role": "wizard", "content": "hi"}]), AUTH, 400,
     "messages[0].role"),
    ("an empty prompt", "/v1/chat/completions", body(messages=[{"role": "user", "content": "  "}]), AUTH, 400,
     "messages"),
    ("a prompt longer than the context", "/v1/chat/completions",
     body(messages=[{"role": "user", "content": "word " * 100}]), AUTH, 400, "messages"),
    ("a wrong API key", "/v1/chat/completions", body(), {"Authorization": "Bearer nope"}, 401, None),
    ("no API key", "/v1/models", None, {}, 401, None),
    ("a non-UTF-8 body", "/v1/chat/completions", b'{"model": "tiny", "messages": "\xff\xfe"}', AUTH, 400, None),
    ("an oversized body", "/v1/chat/completions", body(messages=[{"role": "user", "content": "x" * 70_000}]), AUTH,
     413, None),
    ("an empty completion prompt", "/v1/completions",
     json.dumps({"model": "tiny", "prompt": "", "max_tokens": 4}).encode(), AUTH, 400, "prompt"),
    ("an unknown path", "/v1/embeddings", body(), AUTH, 404, None),
    ("a deeply nested body", "/v1/chat/completions", b"[" * 5000 + b"]" * 5000, AUTH, 400, None),
    ("nesting inside messages", "/v1/chat/completions",
     body(messages=[{"role": "user", "content": json.loads("[" * 40 + "]" * 40)}]), AUTH, 400, None),
    ("top_logprobs 21", "/v1/chat/completions", body(logprobs=True, top_logprobs=21), AUTH, 400, "top_logprobs"),
    ("top_logprobs without logprobs", "/v1/chat/completions", body(top_logprobs=2), AUTH, 400, "top_logprobs"),
    ("logprobs as a number in chat", "/v1/chat/completions", body(logprobs=3), AUTH, 422, "logprobs"),
    ("completions logprobs 6", "/v1/completions",
     json.dumps({"model": "tiny", "prompt": "hi", "max_tokens": 4, "logprobs": 6}).encode(), AUTH, 400, "logprobs"),
    ("an integer of 5,000 digits", "/v1/chat/completions",
     b'{"model": "tiny", "max_tokens": ' + b"9" * 5000 + b', "messages": []}', AUTH, 400, None),
]


@pytest.mark.parametrize("case", BAD_REQUESTS, ids=[c[0] for c in BAD_REQUESTS])
def test_bad_requests_get_their_status_and_the_server_goes_on(server, case):
    _, path, payload, headers, status, param = case
    got, _, answer = server.raw("POST" if payload is not None else "GET", path, payload, headers)
    assert got == status, answer
    error = answer["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in error["message"]
    if param is not None:
        assert error["param"] == param
    ok, _, good = server.raw("POST", "/v1/chat/completions", body(), AUTH)  # served correctly right after
    assert ok == 200 and good["choices"][0]["message"]["content"] is not None


LOGPROB_TOLERANCE = 1e-6  # the lean runtime is row-invariant: measured equal (difference 0); JSON keeps floats exact


def test_logprobs_are_plain_decodings_through_the_openai_client(server, pipe):
    """The server drafts (n-gram); its log probabilities equal plain decoding's for the same tokens,
    whole and streamed, chat and completions."""
    client = server.client()
    plain = pipe.generate(PROMPT, max_new_tokens=24, draft=DraftConfig(draft_len=0), logprobs=3)
    answer = chat(client, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert answer.usage.completion_tokens == len(plain.tokens) == len(content)
    for got, want in zip(content, plain.logprobs):
        assert bytes(got.bytes) == pipe.target.token_bytes(want.token)
        assert got.logprob == pytest.approx(want.logprob, abs=LOGPROB_TOLERANCE)
        assert [t.logprob for t in got.top_logprobs] == pytest.approx([lp for _, lp in want.top],
                                                                      abs=LOGPROB_TOLERANCE)
    assert answer.model_extra["diffdraft"]["steps"] < len(content)  # the answer was speculated

    _, chunks = streamed_text(chat(client, logprobs=True, top_logprobs=3, stream=True))
    streamed = [entry for c in chunks if c.choices and c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == answer.choices[0].message.content
    assert chat(client).choices[0].logprobs is None  # not asked, not given

    completion = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=12, temperature=0, logprobs=2)
    raw = pipe.generate(PROMPT, max_new_tokens=12, draft=DraftConfig(draft_len=0), chat=False, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert logprobs.token_logprobs == pytest.approx([e.logprob for e in raw.logprobs], abs=LOGPROB_TOLERANCE)
    assert len(logprobs.tokens) == len(logprobs.text_offset) == 12
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    assert all(len(top) <= 2 for top in logprobs.top_logprobs)


def test_a_tiny_temperature_answers(server):
    """Found by the fuzzer: temperature 2.1e-263 overflowed the logits into NaN (a 500)."""
    answer = chat(server.client(), temperature=2.1e-263, max_tokens=4)
    assert answer.usage.completion_tokens == 4


def test_unknown_fields_are_ignored(server):
    status, _, answer = server.raw("POST", "/v1/chat/completions", body(frequency_penalty=0, user="x", foo=[1]), AUTH)
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1


class GatedPipeline:
    """The real pipeline, held at a gate before each answer (to fill the queue), slowed per step
    (so a disconnect lands mid-answer), and recording each answer."""

    def __init__(self, pipe, step_s: float = 0.0):
        self.pipe, self.target, self.describe = pipe, pipe.target, "gated"
        self.gate = threading.Event()
        self.gate.set()
        self.started = threading.Semaphore(0)
        self.step_s, self.answers = step_s, []

    def prompt_ids(self, prompt, chat=True):
        return self.pipe.prompt_ids(prompt, chat=chat)

    offers_logprobs = True

    def generate_ids(self, ids, max_new_tokens, sampling, draft, seed, on_text=None, should_stop=None, **logprobs):
        self.started.release()
        self.gate.wait()

        def slow_stop():
            time.sleep(self.step_s)
            return should_stop()

        answer = self.pipe.generate_ids(ids, max_new_tokens, sampling, draft, seed, on_text=on_text,
                                        should_stop=slow_stop, **logprobs)
        self.answers.append(answer)
        return answer


def test_a_full_queue_answers_429_and_loses_nothing(pipe):
    gated = GatedPipeline(pipe)
    gated.gate.clear()
    running = Running(gated, queue_limit=1)
    try:
        results = {}

        def send(name):
            results[name] = running.raw("POST", "/v1/chat/completions", body())

        first = threading.Thread(target=send, args=("running",))
        first.start()
        assert gated.started.acquire(timeout=30)  # the worker holds the first request
        second = threading.Thread(target=send, args=("waiting",))
        second.start()
        deadline = time.monotonic() + 30
        while running.app.state.metrics.queue_depth < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, headers, answer = running.raw("POST", "/v1/chat/completions", body())  # the queue is full
        assert status == 429 and answer["error"]["code"] == "queue_full" and int(headers["retry-after"]) >= 1
        gated.gate.set()
        first.join(60)
        second.join(60)
        assert results["running"][0] == 200 and results["waiting"][0] == 200
        assert running.raw("POST", "/v1/chat/completions", body())[0] == 200
    finally:
        gated.gate.set()
        running.close()


def stream_then_leave(running: Running, max_tokens: int) -> None:
    """Start a streamed chat request, read its first chunk, and go away."""
    conn = http.client.HTTPConnection("127.0.0.1", running.port, timeout=60)
    conn.request("POST", "/v1/chat/completions", body=body(max_tokens=max_tokens, stream=True),
                 headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    assert response.readline().startswith(b"data: ")  # the stream has begun
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()  # the client goes away


def test_a_disconnect_mid_stream_frees_the_worker(pipe):
    gated = GatedPipeline(pipe, step_s=0.02)
    running = Running(gated)
    try:
        stream_then_leave(running, max_tokens=200)
        start = time.monotonic()
        status, _, answer = running.raw("POST", "/v1/chat/completions", body(max_tokens=4))
        waited = time.monotonic() - start
        assert status == 200
        first = gated.answers[0]
        assert first.stop_reason == "cancelled" and len(first.tokens) < 200
        assert waited < 5.0  # 200 steps of 20 ms would take more than 4 s
    finally:
        running.close()


def test_dllm_serving(tiny_model_dir):
    dllm = load_dllm_pipeline(tiny_model_dir, dllm="base", drafter_layers=1, block_size=4)
    running = Running(dllm)
    try:
        client = running.client()
        answer = chat(client, max_tokens=12)
        assert answer.usage.completion_tokens >= 1
        assert answer.model_extra["diffdraft"]["decoder"].startswith("simsd")
        text, _ = streamed_text(chat(client, max_tokens=12, stream=True))
        assert text == answer.choices[0].message.content
        with pytest.raises(openai.BadRequestError, match="log probabilities are not offered"):
            chat(client, max_tokens=4, logprobs=True)
    finally:
        running.close()


def test_two_workers_answer_two_requests_at_once(pipe):
    """With two workers both requests are generating at the same time (both pass the gate's
    start line while it is closed), and each answer is the one a lone request gets: the
    loaded weights are shared, the decoding state is not."""
    prompts = {"rivers": PROMPT, "stars": "Name the brightest stars and how far away they are."}
    alone = {name: pipe.generate(text, max_new_tokens=24).text for name, text in prompts.items()}
    assert len(set(alone.values())) == 2
    gated = GatedPipeline(pipe, step_s=0.005)
    gated.gate.clear()
    running = Running(gated, workers=2)
    try:
        results = {}

        def send(name):
            message = [{"role": "user", "content": prompts[name]}]
            results[name] = running.raw("POST", "/v1/chat/completions", body(messages=message, max_tokens=24))

        threads = [threading.Thread(target=send, args=(name,)) for name in prompts]
        for thread in threads:
            thread.start()
        assert gated.started.acquire(timeout=30) and gated.started.acquire(timeout=30)  # both started, gate closed
        gated.gate.set()
        for thread in threads:
            thread.join(60)
        for name in prompts:
            status, _, answer = results[name]
            assert status == 200 and answer["choices"][0]["message"]["content"] == alone[name]
    finally:
        gated.gate.set()
        running.close()


def test_workers_must_be_positive(pipe):
    with pytest.raises(Exception, match="workers must be a positive integer"):
        ServerSettings(model_name="tiny", workers=0)


def test_5xx_answers_are_counted_in_the_metrics(pipe):
    """A bug inside a request is a 500 with error JSON, counted like every other status."""
    running = Running(pipe)
    try:
        def broken(*args, **kwargs):
            raise RuntimeError("planted")

        running.app.state.worker.submit = broken
        status, _, answer = running.raw("POST", "/v1/chat/completions", body())
        assert status == 500 and answer["error"]["code"] == "internal_error"
        _, _, text = running.raw("GET", "/metrics")
        assert 'diffdraft_requests_total{endpoint="/v1/chat/completions",status="500"} 1' in text
    finally:
        running.close()


def test_a_client_that_leaves_mid_body_is_one_log_line(pipe, caplog):
    import logging

    caplog.set_level(logging.INFO, logger="diffdraft.serve")
    running = Running(pipe)
    try:
        with socket.create_connection(("127.0.0.1", running.port)) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 1000\r\n\r\n{\"model\": ")
            time.sleep(0.3)
        deadline = time.monotonic() + 10
        while "went away before its request was read" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "went away before its request was read" in caplog.text
        assert "Traceback" not in caplog.text
        ok, _, good = running.raw("POST", "/v1/chat/completions", body())
        assert ok == 200
    finally:
        running.close()


def test_the_served_model_id_is_a_short_name(tmp_path):
    from diffdraft.cli import served_name

    gguf = tmp_path / "some" / "dir" / "model.Q4_1.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"")
    assert served_name(str(gguf)) == "model.Q4_1"
    assert served_name(str(tmp_path / "some")) == "some"
    assert served_name(None) == "smollm2" and served_name("org/name") == "org/name"


def test_run_decodes_on_the_callers_thread_and_stops_cleanly_on_sigterm(pipe, monkeypatch):
    """serve.run (what `diffdraft serve` calls): the generation loop runs on the thread that called it (the one
    that loaded the model; docs/design.md, "Serving"), HTTP on a thread of its own, and the answer is generate's;
    then SIGTERM stops the server cleanly: run returns and its signal handlers are gone."""
    import os
    import signal
    import urllib.request

    from diffdraft.serve import run

    expected = pipe.generate(PROMPT, max_new_tokens=24, sampling=SamplingConfig()).text
    decoded_on = []
    generate_ids = pipe.generate_ids
    monkeypatch.setattr(pipe, "generate_ids",
                        lambda *a, **kw: decoded_on.append(threading.get_ident()) or generate_ids(*a, **kw))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    answers = []

    def client() -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5).read()
                break
            except OSError:
                time.sleep(0.05)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=60)
        answers.append(chat(client).choices[0].message.content)
        os.kill(os.getpid(), signal.SIGTERM)

    handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    asking = threading.Thread(target=client, daemon=True)
    asking.start()
    run(pipe, ServerSettings(model_name="tiny"), port=port, log_level="warning")
    asking.join(10)
    assert answers == [expected]
    assert decoded_on == [threading.get_ident()]
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == handlers


def test_run_on_a_port_in_use_is_one_clear_error(pipe):
    from diffdraft.errors import DiffdraftError
    from diffdraft.serve import run

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(DiffdraftError, match=f"could not serve on http://127.0.0.1:{port}"):
            run(pipe, ServerSettings(model_name="tiny"), port=port, log_level="critical")
