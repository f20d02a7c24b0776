"""The OpenAI-compatible HTTP app: routes, API key, body limits, streaming, errors.

POST /v1/chat/completions and /v1/completions (streaming by SSE in OpenAI's chunk format,
ending with `data: [DONE]`), GET /v1/models, /health and /metrics (Prometheus text).
Every answer other than 200 is OpenAI's error JSON with a status from protocol's rules,
401 for a wrong API key, 404 for an unknown model or path, 413 for an oversized body, 429
(with Retry-After) when the queue is full, 500 for a bug; no traceback is ever sent. The
model is loaded before the app is made; generation runs off the event loop, on the Worker's
threads or, with max_batch > 1, on the BatchWorker's one thread, every running request in each
step's one forward.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import queue
import secrets
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from diffdraft.config import DraftConfig
from diffdraft.errors import DiffdraftError
from diffdraft.prompting import check_fits
from diffdraft.serve.metrics import Metrics
from diffdraft.serve.protocol import (FINISH_REASONS, ApiError, GenerationRequest, LogprobsWriter, answer_json,
                                      bad_request, chunk_json, diffdraft_block, new_id, parse_body, parse_request,
                                      usage, usage_chunk_json)
from diffdraft.serve.worker import BatchWorker, Job, Worker

DISCONNECT_POLL_S = 0.25  # how often a waiting non-streaming request checks that its client is still there


class ServerSettings:
    def __init__(self, model_name: str, api_key: str | None = None, queue_limit: int = 16,
                 request_timeout_s: float = 600.0, max_body_bytes: int = 1 << 20, default_max_tokens: int = 512,
                 workers: int = 1, max_batch: int = 1, kv_memory_bytes: int | None = None):
        for name, value in (("queue limit", queue_limit), ("max body bytes", max_body_bytes),
                            ("default max tokens", default_max_tokens), ("workers", workers),
                            ("max batch", max_batch)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise DiffdraftError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(request_timeout_s, (int, float)) and math.isfinite(request_timeout_s)
                and request_timeout_s > 0):
            raise DiffdraftError(f"the request timeout must be a positive number of seconds, got {request_timeout_s!r}")
        self.model_name, self.api_key, self.queue_limit = model_name, api_key, queue_limit
        self.request_timeout_s, self.max_body_bytes, self.default_max_tokens = (request_timeout_s, max_body_bytes,
                                                                                default_max_tokens)
        if workers > 1 and max_batch > 1:
            raise DiffdraftError("a batched server runs one batch on one thread: give --workers or --max-batch, "
                                 "not both")
        self.workers = workers  # requests generated at once, each on its own thread
        self.max_batch = max_batch  # requests stepped together in one forward (1: the thread workers)
        if kv_memory_bytes is not None and (isinstance(kv_memory_bytes, bool) or not isinstance(kv_memory_bytes, int)
                                            or kv_memory_bytes < 1):
            raise DiffdraftError(f"the KV memory limit must be a positive number of bytes, got {kv_memory_bytes!r}")
        self.kv_memory_bytes = kv_memory_bytes  # the batch's KV caches together (None: no limit)

    @property
    def concurrent(self) -> int:
        """Requests generated at once."""
        return max(self.workers, self.max_batch)


log = logging.getLogger("diffdraft.serve")


def create_app(pipeline, settings: ServerSettings, draft: DraftConfig | None = None,
               loop_on_caller: bool = False) -> FastAPI:
    """The app over a loaded pipeline (diffdraft.api Pipeline or DLLMPipeline). Its generation loops run on
    threads of their own, or one of them on the thread that calls `app.state.worker.run_here()`
    (loop_on_caller; serve.run)."""
    metrics = Metrics()
    if settings.max_batch > 1:
        if not pipeline.decoder(draft).takes_batches:
            raise DiffdraftError(f"the {decoder_name_of(pipeline)} decoder does not batch requests: "
                                 "serve it with --max-batch 1")
        worker = BatchWorker(pipeline, draft, metrics, settings.queue_limit, settings.max_batch,
                             settings.kv_memory_bytes, on_caller=loop_on_caller)
    else:
        worker = Worker(pipeline, draft, metrics, settings.queue_limit, threads=settings.workers,
                        on_caller=loop_on_caller)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()

    app = FastAPI(title="diffdraft", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.state.metrics, app.state.worker = metrics, worker
    decoder_name = decoder_name_of(pipeline)


    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError):
        return _error(err)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        code = "not_found" if err.status_code == 404 else None
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return _error(ApiError(err.status_code, message, code=code))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, err: Exception):
        log.error("internal error on %s %s: %s: %s", request.method, request.url.path, type(err).__name__,
                  " ".join(str(err).split())[:300])
        metrics.request(request.url.path, 500)  # every 5xx is counted
        return _error(ApiError(500, "internal server error; see the server's log", type="server_error",
                               code="internal_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue_depth": metrics.queue_depth}

    @app.get("/metrics")
    async def metrics_text(request: Request):
        _check_key(request, settings)  # behind the API key when there is one (Prometheus sends bearer tokens)
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        _check_key(request, settings)
        return {"object": "list", "data": [_model_card(settings.model_name)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        _check_key(request, settings)
        if model_id != settings.model_name:
            raise _unknown_model(model_id, settings)
        return _model_card(settings.model_name)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await _complete(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _complete(request, "completion")

    async def _complete(request: Request, kind: str) -> Response:
        endpoint = request.url.path
        start = time.monotonic()
        try:
            _check_key(request, settings)
            req = parse_request(parse_body(await _read_body(request, settings.max_body_bytes)), kind)
            if req.model != settings.model_name:
                raise _unknown_model(req.model, settings)
            job = _job(req, start)
            try:
                worker.submit(job)
            except queue.Full:
                raise ApiError(429, f"the server is busy: {settings.queue_limit} requests are waiting; retry later",
                               type="rate_limit_error", code="queue_full",
                               headers={"Retry-After": str(_retry_after(metrics, settings.concurrent))}) from None
            kind_, value = await _next_event(job, request)
            if kind_ == "error":
                raise value
            if kind_ == "cancelled":
                metrics.request(endpoint, 499, time.monotonic() - start)
                return Response(status_code=499)
        except ApiError as err:
            metrics.request(endpoint, err.status, time.monotonic() - start)
            return _error(err)
        except ClientDisconnect:
            log.info("%s: the client went away before its request was read", endpoint)
            metrics.request(endpoint, 499, time.monotonic() - start)
            return Response(status_code=499)
        if req.stream:
            return StreamingResponse(_stream(job, request, start, endpoint), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(job, request, start, endpoint)

    def _job(req: GenerationRequest, start: float) -> Job:
        if req.logprobs is not None and not pipeline.offers_logprobs:
            raise ApiError(400, f"log probabilities are not offered by this server's decoder ({decoder_name})",
                           param="top_logprobs" if req.kind == "chat" else "logprobs", code="unsupported_value")
        try:
            ids = pipeline.prompt_ids(req.prompt, chat=req.kind == "chat")
            room = pipeline.target.max_context - len(ids)
            max_tokens = req.max_tokens if req.max_tokens is not None else min(settings.default_max_tokens, room)
            check_fits(pipeline.target, len(ids), max_tokens, param=req.max_tokens_param)
        except DiffdraftError as err:
            raise bad_request(err, code="context_length_exceeded" if "context" in str(err) else None) from None
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        return Job(request=req, ids=ids, max_tokens=max_tokens, seed=seed,
                   deadline=start + settings.request_timeout_s, loop=asyncio.get_running_loop())

    async def _collect(job: Job, request: Request, start: float, endpoint: str) -> Response:
        pieces: list[str] = []
        while True:
            kind_, value = await _next_event(job, request)
            if kind_ == "text":
                if not pieces:
                    metrics.first_token(time.monotonic() - start)
                pieces.append(value[0])
            elif kind_ == "error":
                metrics.request(endpoint, value.status, time.monotonic() - start)
                return _error(value)
            elif kind_ == "cancelled":
                metrics.request(endpoint, 499, time.monotonic() - start)
                return Response(status_code=499)
            elif kind_ == "done":
                answer, reason, _ = value
                logprobs = LogprobsWriter(job.request, pipeline.target.token_bytes)(answer.logprobs or [])
                body = answer_json(job.request, new_id(job.request.kind), "".join(pieces), FINISH_REASONS.get(reason,
                                   "stop"), usage(answer.prompt_tokens, len(answer.tokens)),
                                   diffdraft_block(answer.stats, reason, decoder_name), logprobs)
                metrics.request(endpoint, 200, time.monotonic() - start)
                return JSONResponse(body)

    async def _stream(job: Job, request: Request, start: float, endpoint: str):
        rid, created, req = new_id(job.request.kind), int(time.time()), job.request
        logprobs = LogprobsWriter(req, pipeline.target.token_bytes)
        first = True
        try:
            if req.kind == "chat":
                yield _sse(chunk_json(req, rid, created, None, role=True))
            while True:
                kind_, value = await job.events.get()
                if kind_ == "text":
                    if first:
                        metrics.first_token(time.monotonic() - start)
                        first = False
                    text, entries = value
                    yield _sse(chunk_json(req, rid, created, text, logprobs=logprobs(entries)))
                elif kind_ == "error":  # after the 200 went out: the error travels in the stream
                    metrics.request(endpoint, value.status, time.monotonic() - start)
                    yield _sse(value.body())
                    yield "data: [DONE]\n\n"
                    return
                elif kind_ == "done":
                    answer, reason, entries = value
                    extra = diffdraft_block(answer.stats, reason, decoder_name)
                    last = chunk_json(req, rid, created, None, finish=FINISH_REASONS.get(reason, "stop"),
                                      logprobs=logprobs(entries) if entries else None)
                    yield _sse({**last, "diffdraft": extra})
                    if req.include_usage:
                        yield _sse(usage_chunk_json(req, rid, created, usage(answer.prompt_tokens, len(answer.tokens)),
                                                    extra))
                    yield "data: [DONE]\n\n"
                    metrics.request(endpoint, 200, time.monotonic() - start)
                    return
        finally:
            job.cancel.set()  # a client that went away stops its generation at the next step

    return app


async def _next_event(job: Job, request: Request) -> tuple[str, object]:
    """The job's next event; ("cancelled", None) when the client went away meanwhile (the job is
    cancelled, so the worker drops it or stops it at the next step)."""
    while True:
        try:
            return await asyncio.wait_for(job.events.get(), timeout=DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancel.set()
                return "cancelled", None


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 beyond `limit` bytes (by its Content-Length or as it streams in)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is {limit}", code="body_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"the request body exceeds the limit of {limit} bytes", code="body_too_large")
    return bytes(body)


def _check_key(request: Request, settings: ServerSettings) -> None:
    if settings.api_key is None:
        return
    header = request.headers.get("authorization", "")
    given = header[7:] if header.lower().startswith("bearer ") else ""
    if not secrets.compare_digest(given.encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or incorrect API key (send it as 'Authorization: Bearer KEY')",
                       code="invalid_api_key")


def _unknown_model(name: str, settings: ServerSettings) -> ApiError:
    return ApiError(404, f"the model {name!r} does not exist; this server serves {settings.model_name!r}",
                    param="model", code="model_not_found")


def _model_card(name: str) -> dict:
    return {"id": name, "object": "model", "created": 0, "owned_by": "diffdraft"}


def decoder_name_of(pipeline) -> str:
    return getattr(pipeline, "describe", "diffdraft")


def _retry_after(metrics: Metrics, workers: int) -> int:
    """Seconds a refused client should wait: the mean generation time so far times the rounds of work
    ahead (the requests ahead shared among the workers)."""
    return max(1, math.ceil(metrics.mean_service_s() * max(1, math.ceil(metrics.queue_depth / workers))))


def _error(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
