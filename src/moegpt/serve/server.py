"""`moegpt serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
streaming as server-sent events ending with ``[DONE]``), ``GET /health`` and ``GET /metrics``
(Prometheus). Errors use OpenAI's JSON shape. A client that disconnects cancels its request,
which frees its KV blocks; on SIGTERM uvicorn stops accepting, lets running requests finish
(up to a grace period) and the engine then cancels whatever is left.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from moegpt.errors import UserError
from moegpt.serve.async_engine import AsyncEngine
from moegpt.serve.engine import RequestOutput
from moegpt.serve.protocol import ChatRequest, CompletionRequest, _Request, error_body
from moegpt.serve.sequence import SamplingParams

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
GRACE_S = 30  # how long a SIGTERM waits for running requests


class APIError(Exception):
    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _user_error(e: UserError, prompt_param: str) -> APIError:
    """An engine error ("field: reason") as a 400 naming the request field."""
    field_name, _, _ = str(e).partition(":")
    param = prompt_param if field_name == "prompt" else field_name
    return APIError(400, str(e), param=param)


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class OpenAIServer:
    """The request handling, independent of the HTTP framework's routing."""

    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())
        tokenizer = engine.engine.tokenizer
        self.chat_ids = None
        if tokenizer is not None:
            start, end = tokenizer.token_to_id("<|im_start|>"), tokenizer.token_to_id("<|im_end|>")
            if start is not None and end is not None:
                self.chat_ids = (start, end)

    # -- requests -> engine ----------------------------------------------------------------
    def _check_model(self, req: _Request) -> None:
        if req.model != self.model_name:
            raise APIError(
                404, f"The model `{req.model}` does not exist", "model", "model_not_found"
            )

    def chat_prompt(self, req: ChatRequest) -> str:
        """ChatML: each message as <|im_start|>role\\ncontent<|im_end|>, then the assistant's
        turn opened."""
        if self.chat_ids is None:
            raise APIError(400, "messages: this model's tokenizer has no chat tokens", "messages")
        turns = [f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in req.messages]
        return "".join(turns) + "<|im_start|>assistant\n"

    def sampling(
        self,
        req: _Request,
        ids: list[int],
        max_tokens: int | None,
        logprobs: int | None,
        field_name: str = "max_tokens",
    ) -> SamplingParams:
        """The engine's parameters for ``req`` (its prompt already checked to fit)."""
        room = self.engine.engine.max_context - len(ids)
        if max_tokens is not None and not 0 < max_tokens <= room:
            raise APIError(
                400,
                f"{field_name}: must be in 1..{room} (the context left after a "
                f"{len(ids)}-token prompt), got {max_tokens}",
                field_name,
            )
        default = DEFAULT_COMPLETION_TOKENS if isinstance(req, CompletionRequest) else room
        stop_ids = (self.chat_ids[1],) if isinstance(req, ChatRequest) and self.chat_ids else ()
        return SamplingParams(
            max_tokens=max_tokens if max_tokens is not None else min(default, room),
            temperature=req.temperature,
            top_k=req.top_k,
            top_p=req.top_p,
            seed=req.seed,
            n=req.n,
            stop=req.stops(),
            stop_token_ids=stop_ids,
            logprobs=logprobs,
        )

    def prepare(self, req: CompletionRequest | ChatRequest) -> tuple[list[int], SamplingParams]:
        self._check_model(req)
        param = "prompt" if isinstance(req, CompletionRequest) else "messages"
        try:
            if isinstance(req, CompletionRequest):
                ids = self.engine.engine.encode(req.prompt)
                self.engine.engine.check_prompt(ids)
                return ids, self.sampling(req, ids, req.max_tokens, req.logprobs)
            ids = self.engine.engine.encode(self.chat_prompt(req))
            self.engine.engine.check_prompt(ids)
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            if req.max_completion_tokens is not None:
                return ids, self.sampling(
                    req, ids, req.max_completion_tokens, logprobs, "max_completion_tokens"
                )
            return ids, self.sampling(req, ids, req.max_tokens, logprobs)
        except UserError as e:
            raise _user_error(e, param) from None

    # -- engine -> responses ---------------------------------------------------------------
    def token_text(self, token: int) -> str:
        tokenizer = self.engine.engine.tokenizer
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

    def completion_logprobs(self, entries: list[dict], offset: int) -> dict[str, Any]:
        tokens = [self.token_text(e["token"]) for e in entries]
        offsets, at = [], offset
        for text in tokens:
            offsets.append(at)
            at += len(text)
        return {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e["top"] or []} for e in entries],
            "text_offset": offsets,
        }

    def chat_logprobs(self, entries: list[dict]) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return {
            "content": [
                {
                    **one(e["token"], e["logprob"]),
                    "top_logprobs": [one(t, lp) for t, lp in e["top"] or []],
                }
                for e in entries
            ]
        }

    async def collect(
        self, outputs: AsyncIterator[RequestOutput], params: SamplingParams
    ) -> list[Choice]:
        choices = {i: Choice(i) for i in range(params.n)}
        async with aclosing(outputs) as stream:
            async for out in stream:
                choice = choices[out.index]
                choice.text += out.text
                choice.token_ids += out.token_ids
                choice.logprobs += out.logprobs
                if out.finished:
                    choice.finish_reason = out.finish_reason
        return list(choices.values())

    def completion_body(
        self, req: CompletionRequest, rid: str, prompt_len: int, choices: list[Choice]
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": c.index,
                    "text": c.text,
                    "logprobs": self.completion_logprobs(c.logprobs, 0)
                    if req.logprobs is not None
                    else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": _usage(prompt_len, sum(len(c.token_ids) for c in choices)),
        }

    def chat_body(
        self, req: ChatRequest, rid: str, prompt_len: int, choices: list[Choice]
    ) -> dict[str, Any]:
        return {
            "id": rid,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": [
                {
                    "index": c.index,
                    "message": {"role": "assistant", "content": c.text},
                    "logprobs": self.chat_logprobs(c.logprobs) if req.logprobs else None,
                    "finish_reason": c.finish_reason,
                }
                for c in choices
            ],
            "usage": _usage(prompt_len, sum(len(c.token_ids) for c in choices)),
        }

    async def stream_events(
        self,
        req: CompletionRequest | ChatRequest,
        outputs: AsyncIterator[RequestOutput],
        prompt_len: int,
        params: SamplingParams,
        rid: str,
    ) -> AsyncIterator[str]:
        """Server-sent events in OpenAI's chunk format; leaving early cancels the request. An
        engine failure midway ends the stream with an error event and ``[DONE]``."""
        chat = isinstance(req, ChatRequest)
        kind = "chat.completion.chunk" if chat else "text_completion"
        created = int(time.time())
        generated = 0
        text_seen = dict.fromkeys(range(params.n), 0)

        def event(choices: list[dict], usage: dict | None = None) -> str:
            body = {"id": rid, "object": kind, "created": created, "model": self.model_name}
            body["choices"] = choices
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body)}\n\n"

        if chat:
            yield event(
                [
                    {"index": i, "delta": {"role": "assistant"}, "finish_reason": None}
                    for i in range(params.n)
                ]
            )
        try:
            async with aclosing(outputs) as stream:
                async for out in stream:
                    generated += len(out.token_ids)
                    yield event([self._chunk(req, out, text_seen)])
        except Exception as e:  # the engine failed: say so in the stream's own terms
            failure = error_body(f"internal error: {type(e).__name__}: {e}", "server_error")
            yield f"data: {json.dumps(failure)}\n\n"
        else:
            if req.stream_options is not None and req.stream_options.include_usage:
                yield event([], _usage(prompt_len, generated))
        yield "data: [DONE]\n\n"

    def _chunk(
        self, req: CompletionRequest | ChatRequest, out: RequestOutput, text_seen: dict[int, int]
    ) -> dict[str, Any]:
        reason = out.finish_reason if out.finished else None
        if isinstance(req, ChatRequest):
            chunk: dict[str, Any] = {"index": out.index, "delta": {"content": out.text}}
            chunk["logprobs"] = self.chat_logprobs(out.logprobs) if req.logprobs else None
        else:
            chunk = {"index": out.index, "text": out.text}
            chunk["logprobs"] = (
                self.completion_logprobs(out.logprobs, text_seen[out.index])
                if req.logprobs is not None
                else None
            )
        text_seen[out.index] += len(out.text)
        chunk["finish_reason"] = reason
        return chunk


def _usage(prompt: int, completion: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.1)


def build_app(engine: AsyncEngine, model_name: str, api_key: str | None = None) -> FastAPI:
    server = OpenAIServer(engine, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()  # after uvicorn's graceful wait: cancel what is still running

    app = FastAPI(title="moegpt", lifespan=lifespan)

    def error(
        status: int, message: str, param: str | None = None, code: str | None = None
    ) -> JSONResponse:
        kind = "authentication_error" if status == 401 else "invalid_request_error"
        kind = kind if status < 500 else "server_error"
        return JSONResponse(error_body(message, kind, param, code), status_code=status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error(e.status, e.message, e.param, e.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(400, "body: not valid JSON", None)
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid')}", param)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.middleware("http")
    async def authenticate(request: Request, call_next: Any) -> Response:
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if given != f"Bearer {api_key}":
                return error(401, "Incorrect or missing API key", None, "invalid_api_key")
        return await call_next(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        return PlainTextResponse(engine.metrics(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": server.created}
        card |= {"owned_by": "moegpt", "max_model_len": engine.engine.max_context}
        return {"object": "list", "data": [card]}

    async def respond(
        req: CompletionRequest | ChatRequest, request: Request, prefix: str
    ) -> Response:
        ids, params = server.prepare(req)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        try:  # queued now, so a bad request fails before any response is started
            outputs = engine.stream(ids, params, rid)
        except UserError as e:
            raise _user_error(e, "prompt") from None
        if req.stream:
            events = server.stream_events(req, outputs, len(ids), params, rid)
            return StreamingResponse(events, media_type="text/event-stream")
        # A non-streaming client that hangs up cancels its request too.
        work = asyncio.ensure_future(server.collect(outputs, params))
        watch = asyncio.ensure_future(_until_disconnected(request))
        await asyncio.wait([work, watch], return_when=asyncio.FIRST_COMPLETED)
        watch.cancel()
        if not work.done():
            work.cancel()
            return error(499, "client disconnected")
        body = server.completion_body if isinstance(req, CompletionRequest) else server.chat_body
        return JSONResponse(body(req, rid, len(ids), work.result()))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await respond(req, request, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        return await respond(req, request, "chatcmpl")

    return app


def serve(engine: AsyncEngine, model_name: str, host: str, port: int, api_key: str | None) -> None:
    """Run until SIGINT/SIGTERM."""
    import uvicorn

    app = build_app(engine, model_name, api_key)
    config = uvicorn.Config(
        app, host=host, port=port, timeout_graceful_shutdown=GRACE_S, log_level="warning"
    )
    uvicorn.Server(config).run()
