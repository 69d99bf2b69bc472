"""The OpenAI-compatible HTTP API over one ModelService: /v1/models, /v1/completions, /v1/chat/completions (SSE or
one JSON answer), /health and /metrics. Every endpoint checks the API key when one is set; bodies are size-checked
while they are read, before any JSON decoding; a bad request gets its 4xx and changes nothing else."""
from __future__ import annotations

import asyncio
import hmac
import json

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from mmgpt.runtime.inflight import QueueFull
from mmgpt.serving.protocol import APIError, chunk, completion_response, new_id, parse_chat, parse_completion
from mmgpt.serving.service import ModelService

DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there


class TextStream:
    """Generated ids -> text deltas. A character whose bytes are split across tokens is held back until complete."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.sent = tokenizer, [], 0

    def add(self, tokens: list[int], final: bool) -> str:
        self.ids += [t for t in tokens if t != self.tok.eos_id]
        text = self.tok.decode(self.ids)
        if not final and text.endswith("\ufffd"):
            return ""
        delta, self.sent = text[self.sent:], len(text)
        return delta


def build_app(service: ModelService) -> FastAPI:
    app = FastAPI(title="mmgpt", docs_url=None, redoc_url=None, openapi_url=None)
    settings = service.settings

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        headers = {"Retry-After": "1"} if e.status in (429, 503) else None
        return JSONResponse(e.body(), status_code=e.status, headers=headers)

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {settings.api_key}".encode()):
            raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                           type="authentication_error")

    @app.get("/health")
    async def health(request: Request):
        authorize(request)
        if service.loop.draining:
            raise APIError(503, "the server is shutting down", type="unavailable")
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        lines = [f"mmgpt_{name} {value:g}" for name, value in service.metrics().items()]
        return PlainTextResponse("\n".join(lines) + "\n")

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        model = {"id": service.model_name, "object": "model", "created": int(service.started), "owned_by": "mmgpt",
                 "max_model_len": service.engine.capacity}
        return {"object": "list", "data": [model]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, chat=True)

    async def generate(request: Request, chat: bool):
        authorize(request)
        body = await read_json(request, settings.limits.max_body_bytes)
        parse = parse_chat if chat else parse_completion
        params = parse(body, settings.limits, settings.default_max_tokens)
        if params.model != service.model_name:
            raise APIError(404, f"model {params.model!r} does not exist; this server serves {service.model_name!r} "
                                "(GET /v1/models)", type="not_found_error", param="model")
        requests = service.requests_for(params)
        service.requests_total += 1
        if service.loop.draining:
            service.rejected_total += 1
            raise APIError(503, "the server is shutting down; retry on another replica", type="unavailable")
        queue: asyncio.Queue = asyncio.Queue()
        states = []
        try:
            for i, r in enumerate(requests):
                states.append(service.loop.submit(r, queue, i))
        except QueueFull as e:
            for s in states:
                s.cancel()
            service.rejected_total += 1
            raise APIError(429, f"the server is busy ({e}); retry later", type="rate_limit_error") from None
        rid = new_id("chatcmpl" if chat else "cmpl")
        prompt_tokens = requests[0].context.shape[0] + len(requests[0].prompt)  # the served context is features
        if params.stream:
            service.open_responses += 1  # until the stream's last byte: a drain waits for it (stream() ends it)
            return StreamingResponse(stream(queue, states, rid, params.model, chat), media_type="text/event-stream")
        waiter = asyncio.ensure_future(collect(queue, states))
        service.open_responses += 1
        try:
            while not waiter.done():
                await asyncio.wait({waiter}, timeout=DISCONNECT_POLL_S)
                if not waiter.done() and await request.is_disconnected():
                    break
        finally:
            service.open_responses -= 1
            if not waiter.done():  # the client left (or the handler was cancelled): free its rows
                for s in states:
                    s.cancel()
                waiter.cancel()
        if not waiter.done() or waiter.cancelled():
            raise APIError(499, "the client disconnected")
        choices = waiter.result()
        usage = {"prompt_tokens": prompt_tokens, "completion_tokens": sum(len(s.tokens) for s in states),
                 "total_tokens": prompt_tokens * len(states) + sum(len(s.tokens) for s in states)}
        return completion_response(rid, params.model, chat, choices, usage)

    async def collect(queue: asyncio.Queue, states) -> list[dict]:
        ids = [[] for _ in states]
        left = len(states)
        while left:
            index, tokens, reason = await queue.get()
            ids[index] += [t for t in tokens if t != service.tokenizer.eos_id]
            if reason == "error":
                raise APIError(500, "generation failed on the server; see its log", type="server_error")
            left -= reason is not None
        return [{"index": i, "text": service.tokenizer.decode(ids[i]), "token_ids": ids[i],
                 "finish_reason": states[i].finish_reason} for i in range(len(states))]

    async def stream(queue: asyncio.Queue, states, rid: str, model: str, chat: bool):
        streams = [TextStream(service.tokenizer) for _ in states]
        first = [True] * len(states)
        left = len(states)
        try:
            while left:
                index, tokens, reason = await queue.get()
                if reason == "error":
                    yield sse(APIError(500, "generation failed on the server; see its log", "server_error").body())
                    return
                text = streams[index].add(tokens, final=reason is not None)
                ids = [t for t in tokens if t != service.tokenizer.eos_id]
                if text or ids or reason is not None:
                    yield sse(chunk(rid, model, chat, index, text, ids, reason, first[index]))
                    first[index] = False
                left -= reason is not None
            yield "data: [DONE]\n\n"
        finally:  # the client disconnected mid-stream (or the stream ended): free whatever still runs
            service.open_responses -= 1
            for s in states:
                s.cancel()

    return app


def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def read_json(request: Request, limit: int):
    """The body as JSON, refused with 413 as soon as it passes `limit` bytes (Content-Length or counted)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise APIError(413, f"the request body is {length} bytes, more than the {limit} allowed")
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise APIError(413, f"the request body passes the {limit} bytes allowed")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON ({e})") from None
