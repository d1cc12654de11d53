"""The HTTP routes: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health
and /metrics.

A handler validates the body (protocol.py), encodes the prompts, submits one engine request per
prompt and choice (service.py), and answers with the whole response or streams SSE chunks
(responses.py). A client that goes away cancels its requests, streamed or not.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from phi3_jax.engine.request import check_prompt_fits
from phi3_jax.server import MAX_BODY, protocol
from phi3_jax.server.errors import APIError, invalid
from phi3_jax.server.responses import DONE, Envelope, Tokens, sse, usage
from phi3_jax.server.service import EngineService, Group, with_seed


def create_app(service: EngineService, model_name: str, *, api_key: str | None = None,
               max_body: int = MAX_BODY, warmup: bool = True) -> FastAPI:
    """The server's app on a (not yet started) service; the app's lifespan starts it."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await service.start(warmup=warmup)
        try:
            yield
        finally:
            await service.drain(0)
            await service.stop()
            service.metrics.close()

    app = FastAPI(title="phi3-jax", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.add_middleware(_CountRequests, service=service)
    handler = _Handler(service, model_name, api_key, max_body)

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> JSONResponse:
        return e.response()

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"{request.method} {request.url.path}: {e.detail}"
        return APIError(e.status_code, message).response()

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await handler.completions(request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await handler.chat(request)

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        handler.check_key(request)
        return {"object": "list", "data": [handler.model_card()]}

    @app.get("/v1/models/{model:path}")
    async def model(request: Request, model: str) -> dict:
        handler.check_key(request)
        handler.check_model(model)
        return handler.model_card()

    @app.get("/health")
    async def health() -> JSONResponse:
        status = service.status
        return JSONResponse({"status": status}, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(service.metrics.render(),
                                 media_type="text/plain; version=0.0.4; charset=utf-8")

    return app


class _Handler:
    def __init__(self, service: EngineService, model_name: str, api_key: str | None,
                 max_body: int):
        self.service = service
        self.engine = service.engine
        self.model = service.engine.model
        self.model_name = model_name
        self.api_key = api_key
        self.max_body = max_body
        self.tokens = Tokens(self.model.tokenizer)
        self.created = int(time.time())

    # ---- checks ---------------------------------------------------------------------------

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        scheme, _, key = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           None, "invalid_api_key")
        if not hmac.compare_digest(key.strip().encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", None, "invalid_api_key")

    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{self.model_name!r}", "model", "model_not_found")

    def model_card(self) -> dict[str, Any]:
        return {"id": self.model_name, "object": "model", "created": self.created,
                "owned_by": "phi3-jax", "max_model_len": self.engine.shapes.max_len}

    async def read(self, request: Request, kind: type) -> Any:
        """The checked body: key, size, encoding, JSON, fields, model."""
        self.check_key(request)
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            raise _too_large(int(declared), self.max_body)
        body = bytearray()
        try:
            async for part in request.stream():
                body += part
                if len(body) > self.max_body:
                    raise _too_large(len(body), self.max_body)
        except ClientDisconnect:  # nobody will read the answer
            raise APIError(400, "the client disconnected while sending the body") from None
        parsed = protocol.parse(bytes(body), kind)
        self.check_model(parsed.model)
        return parsed

    def room(self, ids: list[int], asked: int | None, param: str, default: int | None) -> int:
        """max_new_tokens for a prompt: `asked`, if the context has room for it, or the
        default clamped to that room."""
        max_len = self.engine.shapes.max_len
        room = max_len - len(ids)
        if asked is None:
            return room if default is None else min(default, room)
        if asked > room:
            raise APIError(400, f"{param} is {asked}, but the context is {max_len} tokens and "
                                f"the prompt takes {len(ids)}: at most {room} new tokens fit",
                           param, "context_length_exceeded")
        return asked

    # ---- /v1/completions ------------------------------------------------------------------

    async def completions(self, request: Request) -> Response:
        body: protocol.CompletionRequest = await self.read(request, protocol.CompletionRequest)
        prompts = body.prompts()
        tokenizer = self.model.tokenizer
        work, echoes = [], []
        score_only = body.max_tokens == 0  # echo with max_tokens 0: the prompt's logprobs
        for p, prompt in enumerate(prompts):
            param = "prompt" if len(prompts) == 1 else f"prompt[{p}]"
            if isinstance(prompt, str):
                if tokenizer is None:
                    raise invalid("this model has no tokenizer: send the prompt as token ids",
                                  param)
                ids = tokenizer.encode(prompt)
            else:
                ids = prompt
            try:
                check_prompt_fits(self.model.config, ids, param, max_len=self.engine.shapes.max_len)
            except ValueError as e:
                raise invalid(str(e), param, "context_length_exceeded" if ids else None) from None
            new = 1 if score_only else self.room(ids, body.max_tokens, "max_tokens",
                                                  protocol.COMPLETION_MAX_TOKENS)
            settings = body.settings(
                new, logprobs=body.logprobs,
                prompt_logprobs=body.logprobs if body.echo and body.logprobs is not None
                else None)
            echo = ""
            if body.echo:
                echo = prompt if isinstance(prompt, str) else (
                    tokenizer.decode(ids) if tokenizer is not None else "")
            for j in range(body.n):
                work.append((ids, with_seed(settings, j)))
                echoes.append(echo)
        view = _Completions(self, body, Envelope(False, self.model_name), echoes, score_only)
        group = self.service.submit("completions", work, "prompt")
        return await view.answer(request, group, len(prompts), body.n)

    # ---- /v1/chat/completions -------------------------------------------------------------

    async def chat(self, request: Request) -> Response:
        body: protocol.ChatRequest = await self.read(request, protocol.ChatRequest)
        messages = body.chat()
        if self.model.tokenizer is None:
            raise invalid("this model has no tokenizer, so it cannot format a chat; use "
                          "/v1/completions with token ids", "messages")
        try:
            ids = self.model.tokenizer.encode_chat(messages)
            check_prompt_fits(self.model.config, ids, "the chat",
                              max_len=self.engine.shapes.max_len)
        except (ValueError, TypeError) as e:
            raise invalid(str(e), "messages") from None
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        new = self.room(ids, body.max_new_tokens, param, None)
        top = body.top_logprobs if body.top_logprobs is not None else 0
        settings = body.settings(new, logprobs=top if body.logprobs else None)
        work = [(ids, with_seed(settings, j)) for j in range(body.n)]
        view = _Chat(self, body, Envelope(True, self.model_name))
        group = self.service.submit("chat", work, "messages")
        return await view.answer(request, group, 1, body.n)


class _View:
    """How one request's outputs become its response; subclasses format each endpoint."""

    def __init__(self, handler: _Handler, body: Any, envelope: Envelope):
        self.handler = handler
        self.body = body
        self.envelope = envelope
        self.tokens = handler.tokens

    async def answer(self, request: Request, group: Group, prompts: int, n: int) -> Response:
        self.prompt_tokens = sum(len(group.requests[p * n].prompt_ids) for p in range(prompts))
        if self.body.stream:
            return StreamingResponse(self.stream(group), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache",
                                              "X-Accel-Buffering": "no"})
        try:
            if not await _finished_unless_disconnected(group, request):
                return Response(status_code=499)  # nobody reads it
        finally:
            group.cancel()  # the client left, or this task was cancelled
        for r in group.requests:
            _raise_failure(r.finish_reason, r.error)
        choices = [self.whole(i, r) for i, r in enumerate(group.requests)]
        done = sum(self.generated(r.token_ids) for r in group.requests)
        return JSONResponse(self.envelope.body(choices, usage=usage(self.prompt_tokens, done)))

    async def stream(self, group: Group) -> AsyncIterator[bytes]:
        generated = 0
        seen: set[int] = set()
        try:
            for i in range(len(group.requests)):
                first = self.opening(i, group.requests[i])
                if first is not None:
                    yield sse(self.envelope.body([first], chunk=True))
            async for i, output in group.outputs():
                if output.finish_reason in ("error", "cancelled"):
                    group.cancel()
                    yield sse(_failure(output.finish_reason, output.error).body())
                    yield DONE
                    return
                generated += self.generated(output.token_ids)
                choice = self.delta(i, group.requests[i], output, i not in seen)
                seen.add(i)
                if choice is not None:
                    yield sse(self.envelope.body([choice], chunk=True))
            if self.body.include_usage:
                yield sse(self.envelope.body([], chunk=True,
                                             usage=usage(self.prompt_tokens, generated)))
            yield DONE
        finally:
            group.cancel()  # a client that went away frees its rows

    def generated(self, token_ids: list[int]) -> int:
        return len(token_ids)

    def opening(self, index: int, request: Any) -> dict | None:
        return None


class _Completions(_View):
    def __init__(self, handler: _Handler, body: protocol.CompletionRequest,
                 envelope: Envelope, echoes: list[str], score_only: bool):
        super().__init__(handler, body, envelope)
        self.echoes = echoes
        self.score_only = score_only  # max_tokens 0: the generated token is dropped
        self.offsets: dict[int, int] = {}  # choice -> text_offset of its next streamed token

    def generated(self, token_ids: list[int]) -> int:
        return 0 if self.score_only else len(token_ids)

    def logprobs(self, prompt_ids: list[int], prompt: Any, new: Any, offset: int) -> Any:
        if self.body.logprobs is None:
            return None
        entries = []
        if prompt is not None:  # echo: the prompt's tokens first
            entries += list(zip(prompt_ids, prompt, strict=True))
        if not self.score_only:
            entries += [(lp.token_id, lp) for lp in new or ()]
        return self.tokens.completion(entries, offset)

    def whole(self, index: int, request: Any) -> dict:
        done = request.completion()
        text = self.echoes[index] + ("" if self.score_only else done.text or "")
        logprobs = self.logprobs(request.prompt_ids, done.prompt_logprobs, done.logprobs, 0)
        return self.envelope.choice(index, text, logprobs=logprobs,
                                    finish_reason="length" if self.score_only
                                    else done.finish_reason)

    def delta(self, index: int, request: Any, output: Any, first: bool) -> dict | None:
        text = "" if self.score_only else output.text or ""
        echo = self.echoes[index] if first else ""
        prompt = output.prompt_logprobs if first and self.body.echo else None
        # text_offset counts from the start of this choice's text, as in the whole response
        offset = self.offsets.get(index, 0)
        logprobs = self.logprobs(request.prompt_ids, prompt, output.logprobs, offset)
        if logprobs is not None:
            self.offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
        reason = output.finish_reason
        if reason is not None and self.score_only:
            reason = "length"
        if not (echo or text or reason or (logprobs and logprobs["tokens"])):
            return None
        return self.envelope.choice(index, echo + text, logprobs=logprobs, finish_reason=reason,
                                    chunk=True)


class _Chat(_View):
    def opening(self, index: int, request: Any) -> dict | None:
        return self.envelope.choice(index, "", chunk=True, first=True)

    def whole(self, index: int, request: Any) -> dict:
        done = request.completion()
        logprobs = self.tokens.chat(done.logprobs) if done.logprobs is not None else None
        return self.envelope.choice(index, done.text or "", logprobs=logprobs,
                                    finish_reason=done.finish_reason)

    def delta(self, index: int, request: Any, output: Any, first: bool) -> dict | None:
        text = output.text or ""
        logprobs = self.tokens.chat(output.logprobs) if output.logprobs else None
        if not (text or output.finish_reason or logprobs):
            return None
        return self.envelope.choice(index, text, logprobs=logprobs,
                                    finish_reason=output.finish_reason, chunk=True)


# ---- helpers ----------------------------------------------------------------------------------

def _too_large(size: int, limit: int) -> APIError:
    return APIError(413, f"the request body is {size} bytes or more; the limit is {limit}",
                    None, "request_too_large")


def _failure(reason: str, error: str | None) -> APIError:
    if reason == "cancelled":
        return APIError(503, "the request was cancelled: the server is shutting down", None,
                        "cancelled")
    return APIError(500, f"generation failed: {error}", None, "generation_error")


def _raise_failure(reason: str | None, error: str | None) -> None:
    if reason in ("error", "cancelled"):
        raise _failure(reason, error)


async def _finished_unless_disconnected(group: Group, request: Request) -> bool:
    """Waits until every request of the group has finished (True) or the client has gone
    (False)."""
    async def finish() -> None:
        async for _ in group.outputs():
            pass

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work, watch = asyncio.ensure_future(finish()), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        return work.done()
    finally:
        work.cancel()
        watch.cancel()


class _CountRequests:
    """ASGI middleware: counts responses by endpoint and status (streaming untouched)."""

    ENDPOINTS = frozenset({"/v1/completions", "/v1/chat/completions", "/v1/models", "/health",
                           "/metrics"})

    def __init__(self, app: Any, service: EngineService):
        self.app = app
        self.metrics = service.metrics

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"] if scope["path"] in self.ENDPOINTS else "other"

        async def counted(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(path, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counted)
