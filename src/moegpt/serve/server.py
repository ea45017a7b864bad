"""`moegpt serve`: an OpenAI-compatible HTTP API over the engine (FastAPI + uvicorn).

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (both
streaming as server-sent events ending with ``[DONE]``), ``GET /health`` and ``GET /metrics``
(Prometheus). Errors use OpenAI's JSON shape. A client that disconnects cancels its request,
which frees its KV blocks; on SIGTERM uvicorn stops accepting, lets running requests finish
(up to a grace period) and the engine then cancels whatever is left.

Hardening: with an API key every path but /health and /metrics needs it (the docs and
/openapi.json included), compared in constant time. A request body over ``max_body_bytes`` is
refused with 413 while it is read; a prompt is size-checked before it is tokenized, and
tokenized in a worker thread, so the event loop keeps answering; past ``max_waiting`` requests
not yet running, new ones get 503 with Retry-After. Every error, 404 and 405 included, is a
one-line message in OpenAI's shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from torch import Tensor

from moegpt.chat import IMAGE_PLACE
from moegpt.config import ServeConfig
from moegpt.errors import UserError
from moegpt.serve.async_engine import AsyncEngine
from moegpt.serve.engine import RequestOutput
from moegpt.serve.media import decode_image, image_bytes
from moegpt.serve.metrics import RejectedCollector
from moegpt.serve.prompts import PlainEncoder
from moegpt.serve.protocol import (
    UNION_TAGS,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    ImagePart,
    _Request,
    error_body,
)
from moegpt.serve.sequence import SamplingParams
from moegpt.serve.token_bytes import TokenBytes

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions
GRACE_S = 30  # how long a SIGTERM waits for running requests
DEFAULT_MAX_BODY_BYTES = ServeConfig().max_body_bytes
DEFAULT_MAX_WAITING = ServeConfig().max_waiting
OPEN_PATHS = ("/health", "/metrics")  # answered without the API key
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")  # admitted up to max_waiting
TICKET = "moegpt.ticket"  # the ASGI scope's key for a request's place among those waiting
RETRY_AFTER_S = 1

log = logging.getLogger(__name__)


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


def _user_error(e: UserError, prompt_param: str) -> APIError:
    """An engine error ("field: reason") as a 400 naming the request field."""
    field_name, _, _ = str(e).partition(":")
    param = prompt_param if field_name == "prompt" else field_name
    return APIError(400, str(e), param=param)


class Ticket:
    def __init__(self, server: OpenAIServer) -> None:
        self.server: OpenAIServer | None = server

    def release(self) -> None:
        if self.server is not None:
            self.server.preparing -= 1
            self.server = None


@dataclass
class Choice:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    finish_reason: str | None = None


class OpenAIServer:
    """The request handling, independent of the HTTP framework's routing."""

    def __init__(
        self, engine: AsyncEngine, model_name: str, max_waiting: int = DEFAULT_MAX_WAITING
    ) -> None:
        self.engine = engine
        self.model_name = model_name
        self.created = int(time.time())
        self.max_waiting = max_waiting
        self.preparing = 0  # admitted requests not yet handed to the engine (event loop only)
        self.rejected: Counter[str] = Counter()  # requests refused, by reason
        tokenizer = engine.engine.tokenizer
        self.encoder = PlainEncoder(tokenizer) if tokenizer is not None else None
        self.token_bytes = TokenBytes(tokenizer) if tokenizer is not None else None
        self.chat_template = engine.engine.chat_template
        # chat replies stop at the template's end of turn
        self.chat_stop_ids = self.chat_template.end_of_turn_ids() if self.chat_template else ()

    # -- requests -> engine ----------------------------------------------------------------
    def _check_model(self, req: _Request) -> None:
        if req.model != self.model_name:
            raise APIError(
                404, f"The model `{req.model}` does not exist", "model", "model_not_found"
            )

    def admit(self) -> Ticket:
        """A place among the requests waiting for the engine, taken before the body is read:
        past ``max_waiting`` (requests being read, tokenized, queued or preempted) a request
        gets 503 with Retry-After. The ticket is released once the request is queued in the
        engine (no await between, so it is counted all along), or when it fails before."""
        waiting = self.preparing + self.engine.waiting()
        if self.max_waiting and waiting >= self.max_waiting:
            self.rejected["queue_full"] += 1
            raise APIError(
                503,
                f"server busy: {waiting} requests are waiting (limit {self.max_waiting}); "
                f"retry after {RETRY_AFTER_S} s",
                code="server_busy",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            )
        self.preparing += 1
        return Ticket(self)

    def _fits(self, chars: int, param: str) -> None:
        """Refuse text that cannot fit the context before tokenizing it: every character is at
        least one byte, and no token stands for more than ``max_bytes_per_token`` bytes."""
        assert self.encoder is not None
        context = self.engine.engine.max_context
        limit = context * self.encoder.max_bytes_per_token
        if chars > limit:
            raise APIError(
                400,
                f"{param}: {chars:,} characters cannot fit the {context:,}-token context (at "
                f"most {limit:,} bytes of text)",
                param,
            )

    async def encode_prompt(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a /v1/completions prompt. Text is encoded with special-token strings as
        plain text, like chat content: a client's text never becomes a control token by
        accident or by design, and the ids path (``prompt`` as a list of ids) stays the one
        explicit way to send control tokens."""
        if not isinstance(prompt, str):
            return list(prompt)
        if self.encoder is None:
            raise APIError(400, "prompt: text needs a tokenizer; pass token ids", "prompt")
        self._fits(len(prompt), "prompt")
        return (await asyncio.to_thread(self.encoder.encode, [prompt]))[0]

    async def chat_prompt(self, messages: list[ChatMessage]) -> tuple[list[int], list[Tensor]]:
        """The ids of the model's own chat template over ``messages``, the assistant's turn
        opened (see :mod:`moegpt.chat`: a message's text cannot open or close a turn), and the
        images of its ``image_url`` parts, decoded, in order (each becomes an ``<|image|>``
        token where it stood)."""
        if self.chat_template is None:
            raise APIError(
                400,
                "messages: this model has no chat template (chat_template in its "
                "tokenizer_config.json); use /v1/completions",
                "messages",
            )
        turns, urls = [], []
        for i, message in enumerate(messages):
            content = message.content
            texts_sent = (
                [content]
                if isinstance(content, str)
                else [part.text for part in content if not isinstance(part, ImagePart)]
            )
            if any(IMAGE_PLACE in text for text in texts_sent):  # only an image part makes one
                raise APIError(400, f"messages[{i}].content: holds a reserved marker", "messages")
            if not isinstance(content, str):
                texts = []
                for j, part in enumerate(content):
                    if isinstance(part, ImagePart):
                        urls.append((f"messages[{i}].content[{j}].image_url", part.image_url.url))
                        texts.append(IMAGE_PLACE)
                    else:
                        texts.append(part.text)
                content = "".join(texts)
            turns.append({"role": message.role, "content": content})
        self._fits(sum(len(t["role"]) + 1 + len(t["content"]) for t in turns), "messages")
        images = await asyncio.to_thread(self.decode_images, urls)
        return await asyncio.to_thread(self.chat_template.encode, turns, True), images

    def decode_images(self, urls: list[tuple[str, str]]) -> list[Tensor]:
        """Each (field, data URL) as the model's input image; one line naming the field of
        the first that is refused."""
        vision = self.engine.engine.vision
        if urls and vision is None:
            raise UserError(f"{urls[0][0]}: this model has no vision encoder (a text model)")
        limit = self.engine.engine.config.max_images
        if len(urls) > limit:
            raise UserError(
                f"{urls[limit][0]}: more than the {limit} images a request may send "
                "(serve.max_images)"
            )
        size = vision.config.image_size if vision is not None else 0
        return [decode_image(image_bytes(url, field), size, field) for field, url in urls]

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
        stop_ids = self.chat_stop_ids if isinstance(req, ChatRequest) else ()
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

    async def prepare(
        self, req: CompletionRequest | ChatRequest
    ) -> tuple[list[int], SamplingParams, list[Tensor]]:
        """The request's prompt ids, sampling parameters and images."""
        self._check_model(req)
        param = "prompt" if isinstance(req, CompletionRequest) else "messages"
        try:
            if isinstance(req, CompletionRequest):
                ids = await self.encode_prompt(req.prompt)
                self.engine.engine.check_prompt(ids)
                return ids, self.sampling(req, ids, req.max_tokens, req.logprobs), []
            ids, images = await self.chat_prompt(req.messages)
            self.engine.engine.check_prompt(ids)
            logprobs = (req.top_logprobs or 0) if req.logprobs else None
            if req.max_completion_tokens is not None:
                field_name = "max_completion_tokens"
                params = self.sampling(req, ids, req.max_completion_tokens, logprobs, field_name)
                return ids, params, images
            return ids, self.sampling(req, ids, req.max_tokens, logprobs), images
        except UserError as e:
            raise _user_error(e, param) from None

    # -- engine -> responses ---------------------------------------------------------------
    def token_text(self, token: int) -> str:
        tokenizer = self.engine.engine.tokenizer
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

    def completion_logprobs(self, entries: list[dict], offset: int) -> tuple[dict[str, Any], int]:
        """Legacy completions' log-probabilities, and the offset the next token will have:
        ``text_offset`` counts each token's text from ``offset`` on (0 at the completion's
        start, however the text was split into chunks), as vLLM counts it."""
        tokens = [self.token_text(e["token"]) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(offset)
            offset += len(text)
        body = {
            "tokens": tokens,
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{self.token_text(t): lp for t, lp in e["top"] or []} for e in entries],
            "text_offset": offsets,
        }
        return body, offset

    def chat_logprobs(self, entries: list[dict]) -> dict[str, Any]:
        def one(token: int, logprob: float) -> dict[str, Any]:
            text = self.token_text(token)
            raw = self.token_bytes(token) if self.token_bytes else text.encode()
            return {"token": text, "logprob": logprob, "bytes": list(raw)}

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
                    "logprobs": self.completion_logprobs(c.logprobs, 0)[0]
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
        text_offset = dict.fromkeys(range(params.n), 0)  # where each choice's next token is

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
                    yield event([self._chunk(req, out, text_offset)])
        except Exception as e:  # the engine failed: say so in the stream's own terms
            failure = error_body(f"internal error: {type(e).__name__}: {e}", "server_error")
            yield f"data: {json.dumps(failure)}\n\n"
        else:
            if req.stream_options is not None and req.stream_options.include_usage:
                yield event([], _usage(prompt_len, generated))
        yield "data: [DONE]\n\n"

    def _chunk(
        self, req: CompletionRequest | ChatRequest, out: RequestOutput, text_offset: dict[int, int]
    ) -> dict[str, Any]:
        reason = out.finish_reason if out.finished else None
        if isinstance(req, ChatRequest):
            chunk: dict[str, Any] = {"index": out.index, "delta": {"content": out.text}}
            chunk["logprobs"] = self.chat_logprobs(out.logprobs) if req.logprobs else None
        else:
            chunk = {"index": out.index, "text": out.text, "logprobs": None}
            if req.logprobs is not None:
                chunk["logprobs"], text_offset[out.index] = self.completion_logprobs(
                    out.logprobs, text_offset[out.index]
                )
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


class _ErrorResponse(JSONResponse):
    """An error as ASCII JSON: text from the request (a lone surrogate, say) is escaped
    rather than failing to encode, which would turn a 4xx into a dropped connection."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    kind = "authentication_error" if status == 401 else "invalid_request_error"
    kind = kind if status < 500 else "server_error"
    body = error_body(message, kind, param, code)
    return _ErrorResponse(body, status_code=status, headers=headers)


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware in front of the routes: the API key (every path but ``OPEN_PATHS``,
    compared in constant time); for generation, a place among the waiting requests (so
    bodies read at once are bounded too); then the body limit, enforced as the body is read:
    a Content-Length over the limit is refused before reading, and a chunked body once its
    bytes pass the limit (the rest is never read). The body read is then handed on whole."""

    def __init__(
        self, app: ASGIApp, server: OpenAIServer, api_key: str | None, max_body_bytes: int
    ) -> None:
        self.app = app
        self.server = server
        self.expected = f"Bearer {api_key}".encode() if api_key else None
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        if self.expected is not None and scope["path"] not in OPEN_PATHS:
            given = headers.get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):
                refusal = error_response(
                    401, "Incorrect or missing API key", None, "invalid_api_key"
                )
                await refusal(scope, receive, send)
                return
        if scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self._pass_body(scope, receive, send, headers)
            return
        try:
            ticket = self.server.admit()
        except APIError as e:
            refusal = error_response(e.status, e.message, e.param, e.code, e.headers)
            await refusal(scope, receive, send)
            return
        scope[TICKET] = ticket
        try:
            await self._pass_body(scope, receive, send, headers)
        finally:
            ticket.release()

    async def _pass_body(
        self, scope: Scope, receive: Receive, send: Send, headers: Headers
    ) -> None:
        try:
            body = await self._read_body(headers, receive)
        except _BodyTooLarge:
            message = (
                f"body: larger than this server's limit of {self.max_body_bytes:,} bytes "
                "(moegpt serve --max-body-bytes)"
            )
            await error_response(413, message, None, "request_too_large")(scope, receive, send)
            return
        except ValueError:
            await error_response(400, "Content-Length: not a number")(scope, receive, send)
            return
        if body is None:  # the client left while sending
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _read_body(self, headers: Headers, receive: Receive) -> bytes | None:
        length = headers.get("content-length")
        if length is not None and int(length) > self.max_body_bytes:
            raise _BodyTooLarge
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise _BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _unparsable_body(e: StarletteHTTPException) -> str:
    """FastAPI's "There was an error parsing the body" (a 400 raised from the parser's own
    exception) as one line that says what was wrong."""
    cause = e.__cause__
    if isinstance(cause, UnicodeDecodeError):
        return f"body: not valid UTF-8 (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "body: JSON nested too deeply"
    return f"body: could not be parsed{f' ({type(cause).__name__})' if cause else ''}"


def build_app(
    engine: AsyncEngine,
    model_name: str,
    api_key: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_waiting: int = DEFAULT_MAX_WAITING,
) -> FastAPI:
    """The app; ``app.state.server`` is its :class:`OpenAIServer`."""
    server = OpenAIServer(engine, model_name, max_waiting)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.shutdown()  # after uvicorn's graceful wait: cancel what is still running

    app = FastAPI(title="moegpt", lifespan=lifespan)
    app.state.server = server
    app.add_middleware(Guard, server=server, api_key=api_key, max_body_bytes=max_body_bytes)
    error = error_response

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return error(e.status, e.message, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> JSONResponse:
        first = e.errors()[0]
        loc = [str(p) for p in first.get("loc", ()) if p != "body" and p not in UNION_TAGS]
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            return error(400, f"body: not valid JSON{f' ({reason})' if reason else ''}", None)
        param = loc[0] if loc else None
        where = ".".join(loc) or "body"
        return error(400, f"{where}: {first.get('msg', 'invalid')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        """Routing's 404 and 405, FastAPI's unparsable body: in OpenAI's shape too."""
        if e.status_code == 400 and e.__cause__ is not None:
            return error(400, _unparsable_body(e))
        what = f"{request.method} {request.url.path}"
        message = {404: f"{what}: no such endpoint", 405: f"{what}: method not allowed"}.get(
            e.status_code, f"{what}: {e.detail}"
        )
        return error(e.status_code, message, headers=e.headers)

    @app.exception_handler(Exception)
    async def crashed(request: Request, e: Exception) -> JSONResponse:
        return error(500, f"internal error: {type(e).__name__}: {e}")

    @app.get("/health")
    async def health() -> Response:
        if engine.dead is not None:  # the process is on its way out (see serve)
            return error(503, f"engine stopped after a failed step: {engine.dead}")
        return JSONResponse({"status": "ok"})

    registry = CollectorRegistry()  # the app's own: many apps may live in one process
    registry.register(engine.metrics())
    registry.register(RejectedCollector(server.rejected))

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {"id": model_name, "object": "model", "created": server.created}
        card |= {"owned_by": "moegpt", "max_model_len": engine.engine.max_context}
        return {"object": "list", "data": [card]}

    async def respond(
        req: CompletionRequest | ChatRequest, request: Request, prefix: str
    ) -> Response:
        server._check_model(req)
        rid = f"{prefix}-{uuid.uuid4().hex}"
        ids, params, images = await server.prepare(req)
        try:  # queued now, so a bad request fails before any response is started
            outputs = engine.stream(ids, params, rid, images)
        except UserError as e:
            raise _user_error(e, "prompt") from None
        request.scope[TICKET].release()  # counted as waiting by the engine from now on
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

    async def answer(
        req: CompletionRequest | ChatRequest, request: Request, prefix: str
    ) -> Response:
        """An unexpected failure as a 500 answered here: an exception left to the outermost
        handler is re-raised after its response, and uvicorn then drops the connection."""
        try:
            return await respond(req, request, prefix)
        except APIError:
            raise
        except Exception as e:
            log.exception("request failed")
            raise APIError(500, f"internal error: {type(e).__name__}: {e}") from e

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request) -> Response:
        return await answer(req, request, "cmpl")

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        return await answer(req, request, "chatcmpl")

    return app


def listening_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` for :func:`serve`, or one line saying why not (taken
    before the model loads: uvicorn would find a busy port only after it)."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as e:
        raise UserError(f"--host: cannot resolve {host!r} ({e.strerror})") from None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
    try:
        sock.bind((host, port))
        sock.listen(2048)  # at once: two sockets may bind one port with SO_REUSEADDR, not listen
    except OSError as e:
        sock.close()
        raise UserError(f"--port: cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


def serve(
    engine: AsyncEngine,
    model_name: str,
    sock: socket.socket,
    api_key: str | None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_waiting: int = DEFAULT_MAX_WAITING,
) -> None:
    """Serve on ``sock`` (:func:`listening_socket`) until SIGINT/SIGTERM, or until the engine
    stops after a step it cannot recover from (tensor-parallel ranks out of step): the server
    then shuts down and this raises, so that the process exits with an error and torchrun
    stops the other ranks rather than leaving them in a collective until its timeout."""
    import uvicorn

    app = build_app(engine, model_name, api_key, max_body_bytes, max_waiting)
    config = uvicorn.Config(app, timeout_graceful_shutdown=GRACE_S, log_level="warning")
    server = uvicorn.Server(config)

    def stop() -> None:
        server.should_exit = True  # read by uvicorn's main loop: set from any thread

    engine.on_dead = stop
    server.run(sockets=[sock])
    if engine.dead is not None:
        raise RuntimeError(
            f"the engine stopped after a failed step: {engine.dead}"
        ) from engine.dead
