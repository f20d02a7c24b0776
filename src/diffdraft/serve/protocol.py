"""OpenAI's request and response shapes: a request body in, a checked GenerationRequest out, and the
JSON of answers, stream chunks and errors.

Bodies are parsed here, not by the framework, so that every failure has OpenAI's error JSON
and a documented status: a body that is not UTF-8 or not JSON is 400, a field of the wrong
type or a missing one is 422, a bad value (temperature -1, n=2, an empty message list) is
400. Unknown fields are ignored, as OpenAI does. The checks shared with the CLI (prompt
text, roles, context room, sampling values) are diffdraft.prompting's and SamplingConfig's.
Knows nothing of models or the worker.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from diffdraft.config import SamplingConfig
from diffdraft.errors import DiffdraftError
from diffdraft.logprobs import MAX_TOP_LOGPROBS, TokenLogprob
from diffdraft.stats import Stats

MAX_STOPS = 4
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limit for the completions endpoint's `logprobs`


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(err: DiffdraftError, code: str | None = None) -> ApiError:
    """A user error from the shared checks or the pipeline as a 400 on one line, naming its field
    where the check said which (prompting.RequestError.param)."""
    return ApiError(400, " ".join(str(err).split()), param=getattr(err, "param", None), code=code)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Strict):
    type: str
    text: str | None = None


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class _Common(_Strict):
    model: str
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # an extension: OpenAI has no top_k
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None


class ChatBody(_Common):
    messages: list[Message]
    logprobs: bool | None = None
    top_logprobs: int | None = None


class CompletionBody(_Common):
    prompt: str | list[str]
    logprobs: int | None = None


@dataclass
class GenerationRequest:
    """A checked request: what to answer and how."""

    kind: Literal["chat", "completion"]
    model: str
    prompt: str | list[dict]  # completion text, or chat messages [{"role", "content"}]
    max_tokens: int | None  # None: the server's default, within the context
    max_tokens_param: str
    sampling: SamplingConfig
    seed: int | None
    stops: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # None: no log probabilities; else how many alternatives per token


# No request needs deeper JSON than this (messages -> a message -> content parts -> a part -> its fields).
MAX_JSON_DEPTH = 16


def parse_body(raw: bytes) -> dict:
    """The JSON object of a request body; 400 when it is not UTF-8, not JSON, nested deeper than
    MAX_JSON_DEPTH, holds an integer too long for Python to read, or is not an object."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {err.start})", code="invalid_body") from None
    depth = json_depth(text)
    if depth > MAX_JSON_DEPTH:
        raise ApiError(400, f"the request body nests {depth} levels deep; the limit is {MAX_JSON_DEPTH}",
                       code="invalid_json")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise ApiError(400, f"the request body is not valid JSON: {err.msg} at line {err.lineno} column {err.colno}",
                       code="invalid_json") from None
    except (ValueError, RecursionError) as err:  # e.g. an integer beyond Python's digit limit
        raise ApiError(400, f"the request body cannot be read: {' '.join(str(err).split())[:200]}",
                       code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return data


_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"')  # a string literal, escapes included
_BRACKET = re.compile(r"[\[\]{}]")


def json_depth(text: str) -> int:
    """The deepest nesting of [ and { in JSON text, brackets inside strings not counted (a scan, no recursion)."""
    depth = deepest = 0
    for bracket in _BRACKET.findall(_JSON_STRING.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def parse_request(data: dict, kind: Literal["chat", "completion"]) -> GenerationRequest:
    """A checked GenerationRequest from a body's JSON object (see the module docstring for statuses)."""
    try:
        body = (ChatBody if kind == "chat" else CompletionBody).model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        param = _param(first["loc"])
        raise ApiError(422, f"{param}: {first['msg']}", param=param or None, code="invalid_type") from None
    if body.n is not None and body.n != 1:
        raise ApiError(400, f"n must be 1 (one answer per request), got {body.n}", param="n", code="unsupported_value")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > MAX_STOPS or any(not s for s in stops):
        raise ApiError(400, f"stop takes up to {MAX_STOPS} non-empty strings", param="stop")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise ApiError(400, f"seed must be in [0, 2**63), got {body.seed}", param="seed")
    both = body.max_tokens is not None and body.max_completion_tokens is not None
    if both and body.max_tokens != body.max_completion_tokens:
        raise ApiError(400, "max_tokens and max_completion_tokens differ: give one", param="max_tokens")
    param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        raise ApiError(400, f"{param} must be at least 1, got {max_tokens}", param=param)
    try:
        sampling = SamplingConfig(temperature=1.0 if body.temperature is None else body.temperature,
                                  top_k=body.top_k or 0, top_p=1.0 if body.top_p is None else body.top_p)
    except DiffdraftError as err:
        raise ApiError(400, str(err), param=str(err).split()[0]) from None
    logprobs = _logprobs(body, kind)
    if kind == "chat":
        prompt = [{"role": "system" if m.role == "developer" else m.role, "content": _text(m, i)}
                  for i, m in enumerate(body.messages)]
    else:
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise ApiError(400, "prompt must be one string (a batch of prompts is not supported)", param="prompt")
            body.prompt = body.prompt[0]
        prompt = body.prompt
    return GenerationRequest(kind=kind, model=body.model, prompt=prompt, max_tokens=max_tokens,
                             max_tokens_param=param, sampling=sampling, seed=body.seed, stops=stops,
                             stream=body.stream,
                             include_usage=bool(body.stream_options and body.stream_options.include_usage),
                             logprobs=logprobs)


def _logprobs(body: ChatBody | CompletionBody, kind: str) -> int | None:
    """How many alternatives per token the request asks for, None for no log probabilities (OpenAI's
    rules: chat has logprobs true/false and top_logprobs 0..20, completions logprobs 0..5)."""
    if kind == "completion":
        if body.logprobs is not None and not 0 <= body.logprobs <= MAX_COMPLETION_LOGPROBS:
            raise ApiError(400, f"logprobs must be in 0..{MAX_COMPLETION_LOGPROBS}, got {body.logprobs}",
                           param="logprobs")
        return body.logprobs
    if body.top_logprobs is not None:
        if not 0 <= body.top_logprobs <= MAX_TOP_LOGPROBS:
            raise ApiError(400, f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {body.top_logprobs}",
                           param="top_logprobs")
        if not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    return (body.top_logprobs or 0) if body.logprobs else None


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "TextPart", "StreamOptions", "Message"}


def _param(loc: tuple) -> str:
    """A field path from a pydantic error location, without the union-member tags it adds
    (('stop', 'list[str]', 0) -> 'stop.0')."""
    return ".".join(str(p) for p in loc if isinstance(p, int) or (p not in _TYPE_TAGS and "[" not in p))


def _text(message: Message, i: int) -> str:
    """A message's content as text: a string, or the text parts of a list joined."""
    if message.content is None:
        raise ApiError(400, f"messages[{i}].content is missing", param=f"messages.{i}.content")
    if isinstance(message.content, str):
        return message.content
    if any(part.type != "text" or part.text is None for part in message.content):
        raise ApiError(400, f"messages[{i}].content: only text parts are supported", param=f"messages.{i}.content")
    return "".join(part.text for part in message.content)


# ----- answers -----
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "deadline": "length"}


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def diffdraft_block(stats: Stats, stop_reason: str, decoder: str) -> dict:
    """What diffdraft adds to an answer: how the speculation went."""
    return {"decoder": decoder, "stop_reason": stop_reason, "tau": round(stats.tau, 4), "steps": stats.steps,
            "tokens_per_step": list(stats.emitted), "accepted_per_step": list(stats.accepted),
            "tokens_per_s": round(stats.tokens_per_s, 2)}


class LogprobsWriter:
    """The JSON of a request's log probabilities in its endpoint's shape, chunk after chunk: chat's
    `{"content": [{token, logprob, bytes, top_logprobs}]}`, completions' `{tokens, token_logprobs,
    top_logprobs, text_offset}`. `token_bytes` gives the bytes a token id stands for: a token
    that holds part of a UTF-8 character shows U+FFFD in `token`, and its `bytes` join with its
    neighbours' into the text. text_offset counts the whole characters of the answer before the token."""

    def __init__(self, request: GenerationRequest, token_bytes):
        self.kind, self.token_bytes = request.kind, token_bytes
        self.asked = request.logprobs is not None
        self.before = b""  # the answer's bytes so far (completions' text_offset)

    def __call__(self, entries: list[TokenLogprob]) -> dict | None:
        if not self.asked:
            return None
        if self.kind == "chat":
            return {"content": [{**self._token(e.token, e.logprob),
                                 "top_logprobs": [self._token(t, lp) for t, lp in e.top]} for e in entries],
                    "refusal": None}
        offsets = []
        for e in entries:
            offsets.append(len(self.before.decode("utf-8", "ignore")))
            self.before += self.token_bytes(e.token)
        return {"tokens": [self._text(e.token) for e in entries], "token_logprobs": [e.logprob for e in entries],
                "top_logprobs": [{self._text(t): lp for t, lp in e.top} for e in entries], "text_offset": offsets}

    def _text(self, token: int) -> str:
        return self.token_bytes(token).decode("utf-8", "replace")

    def _token(self, token: int, logprob: float) -> dict:
        return {"token": self._text(token), "logprob": logprob, "bytes": list(self.token_bytes(token))}


def answer_json(request: GenerationRequest, rid: str, text: str, finish: str, usage_: dict, extra: dict,
                logprobs: dict | None = None) -> dict:
    """A whole answer; logprobs: the LogprobsWriter's JSON for all its tokens."""
    choice = {"index": 0, "finish_reason": finish, "logprobs": logprobs}
    if request.kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": rid, "object": "chat.completion" if request.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": request.model, "choices": [choice], "usage": usage_,
            "diffdraft": extra}


def chunk_json(request: GenerationRequest, rid: str, created: int, text: str | None, finish: str | None = None,
               role: bool = False, logprobs: dict | None = None) -> dict:
    """One stream chunk: a text delta, the opening role (chat), or the closing finish reason; logprobs:
    the LogprobsWriter's JSON for the tokens that arrived with it."""
    if request.kind == "chat":
        delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
        kind = "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": request.model, "choices": [choice]}


def usage_chunk_json(request: GenerationRequest, rid: str, created: int, usage_: dict, extra: dict) -> dict:
    kind = "chat.completion.chunk" if request.kind == "chat" else "text_completion"
    return {"id": rid, "object": kind, "created": created, "model": request.model, "choices": [], "usage": usage_,
            "diffdraft": extra}
