"""Fuzzing (Hypothesis): hostile request bodies against the server and hostile argument vectors
against the command line. No 5xx, no traceback, ever.

Server: bodies built field by field from OpenAI's request fields, each left out, given a good
value, or given a hostile one (any JSON value, NaN and infinities, huge integers, deep
nesting), plus raw bytes; each answer must be a 200 or a 4xx with OpenAI's error JSON, and a
streamed 200 must end in [DONE] with no internal error inside. Command line: each subcommand
with options drawn from its own parser and hostile values; every run ends with exit 0 or 2 on
one line of stderr (never 1, an internal error), and a refused run leaves no file behind.

The suite runs a bounded, derandomized number of examples; DIFFDRAFT_FUZZ_EXAMPLES=N runs N
random ones (the longer run in the closing note of issue 25).
"""

from __future__ import annotations

import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from diffdraft.cli import build_parser, main
from test_serve import AUTH, Running

LONG_RUN = os.environ.get("DIFFDRAFT_FUZZ_EXAMPLES")
FUZZ = settings(max_examples=int(LONG_RUN) if LONG_RUN else 200, derandomize=not LONG_RUN, deadline=None,
                database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ----------------------------------------------------------------------------------------- server
json_leaf = (st.none() | st.booleans() | st.integers(min_value=-(10**30), max_value=10**30)
             | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12))
json_value = st.recursive(json_leaf, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=12)
hostile = (json_value | st.sampled_from([-1, 0, 2**63, 10**400, "", "  ", [], {}, [[[[[[]]]]]], "\x00", "\ud7ff"]))


messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer"]),
                                           "content": st.text(min_size=1, max_size=30) | st.lists(
                                               st.fixed_dictionaries({"type": st.just("text"),
                                                                      "text": st.text(min_size=1, max_size=10)}),
                                               min_size=1, max_size=2)}),
                    min_size=1, max_size=3)
COMMON = {  # a good value for each field (hostile ones come from `hostile`)
    "model": st.just("tiny"),
    "max_tokens": st.integers(1, 8),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0.01, 1),
    "top_k": st.integers(0, 50),
    "seed": st.integers(0, 2**63 - 1),
    "stop": st.text(min_size=1, max_size=3) | st.lists(st.text(min_size=1, max_size=3), max_size=4),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
    "n": st.just(1),
}
CHAT = {**COMMON, "messages": messages, "logprobs": st.just(True), "top_logprobs": st.integers(0, 20)}
COMPLETION = {**COMMON, "prompt": st.text(min_size=1, max_size=30), "logprobs": st.integers(0, 5)}
REQUIRED = {"model", "messages", "prompt"}
HOSTILE_ONLY = ["max_completion_tokens", "messages.0.content", "messages.0.role"]  # fields only ever made hostile


@st.composite
def bodies(draw, fields: dict) -> dict:
    """A body of plausible values (optional fields left out at random), then 0-2 fields made hostile:
    most bodies get past the type checks, so generation itself is fuzzed too."""
    body = {name: draw(good) for name, good in fields.items() if name in REQUIRED or draw(st.booleans())}
    for name in draw(st.lists(st.sampled_from(sorted(fields) + HOSTILE_ONLY), max_size=2, unique=True)):
        value = draw(hostile | st.just(...))  # ... drops the field
        if name.startswith("messages."):  # inside the first message
            first = body["messages"][0] if isinstance(body.get("messages"), list) and body["messages"] else None
            if isinstance(first, dict):
                key = name.split(".")[-1]
                if value is ...:
                    first.pop(key, None)
                else:
                    first[key] = value
        else:
            body[name] = value
    return {k: v for k, v in body.items() if v is not ...}


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    from diffdraft.api import load

    running = Running(load(tiny_model_dir, drafter="ngram", threads=1), api_key="test-key",
                      max_body_bytes=16 * 1024, default_max_tokens=8)
    yield running
    running.close()


def check_answer(status: int, answer) -> None:
    event(f"status {status}")  # the spread of answers, in --hypothesis-show-statistics
    assert status < 500, answer
    text = answer if isinstance(answer, str) else json.dumps(answer)
    assert "Traceback" not in text and "internal_error" not in text, text
    if status != 200:
        assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["message"]
        assert "\n" not in answer["error"]["message"]
    elif isinstance(answer, str):  # a stream
        assert answer.rstrip().endswith("data: [DONE]"), answer


def encoded(body: dict) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


@FUZZ
@given(body=bodies(CHAT))
def test_fuzzed_chat_bodies_never_fail_the_server(server, body):
    check_answer(*server.raw("POST", "/v1/chat/completions", encoded(body), AUTH)[::2])


@FUZZ
@given(body=bodies(COMPLETION))
def test_fuzzed_completion_bodies_never_fail_the_server(server, body):
    check_answer(*server.raw("POST", "/v1/completions", encoded(body), AUTH)[::2])


@FUZZ
@given(raw=st.binary(max_size=300) | json_value.map(lambda v: json.dumps(v, allow_nan=True).encode()),
       path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]))
def test_fuzzed_raw_bodies_never_fail_the_server(server, raw, path):
    check_answer(*server.raw("POST", path, raw, AUTH)[::2])


# ------------------------------------------------------------------------------------ command line
SUBCOMMANDS = build_parser()._subparsers._group_actions[0].choices  # name -> its parser
PATH_OPTIONS = {"out", "data", "prompts", "eval_data", "init_from", "model", "drafter", "dllm_drafter"}
hostile_text = st.one_of(
    st.sampled_from(["", "-1", "0", "1", "2", "65", "0.5", "1.5", "nan", "inf", "-inf", "1e400", "9" * 30, "abc", "1,2",
                     ",", "0,,1", " ", "--", "-", "ngram", "b4", "base", "auto", "cuda", "cpu", "float32", "\u00e9t\u00e9"]),
    st.text(max_size=8))
safe_path = st.sampled_from(["o", "out/run", "nonexistent/x", "/nonexistent-model", "", "-"])


def option_argv(action) -> st.SearchStrategy:
    """One option with values fitting its arity: none for a flag, 0-3 for nargs * or +."""
    flag = action.option_strings[-1]
    value = safe_path if action.dest in PATH_OPTIONS else hostile_text
    if action.nargs == 0:
        return st.just([flag])
    if action.nargs in ("*", "+"):
        return st.lists(value, min_size=0, max_size=3).map(lambda vs: [flag, *vs])
    return value.map(lambda v: [flag, v])


@st.composite
def argv(draw) -> list[str]:
    name = draw(st.sampled_from(sorted(SUBCOMMANDS)))
    parser = SUBCOMMANDS[name]
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    positionals = [a for a in parser._actions if not a.option_strings]
    chosen = draw(st.lists(st.sampled_from(options), max_size=5, unique_by=lambda a: a.dest)) if options else []
    words = [name] + [draw(safe_path if a.dest in PATH_OPTIONS else hostile_text) for a in positionals]
    for action in chosen:
        words += draw(option_argv(action))
    if any(a.dest == "model" for a in options):
        words += ["--model", "/nonexistent-model"]  # never load (or download) a real model
    return words


@FUZZ
@given(words=argv())
def test_fuzzed_command_lines_end_in_one_line(words, tmp_path, monkeypatch, capsys):
    work = tmp_path / "fuzz"
    work.mkdir(exist_ok=True)
    monkeypatch.chdir(work)
    monkeypatch.setenv("DIFFDRAFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO(""))
    before = sorted(work.rglob("*"))
    code = main(words)
    event(f"exit {code}")
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out, (words, err)
    assert code in (0, 2), (words, code, err)  # 1 would be an internal error
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and err.startswith("diffdraft: error:"), (words, err)
        assert sorted(work.rglob("*")) == before, (words, "a refused run left files behind")
