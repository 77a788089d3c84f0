"""``htc-vlm serve``: an OpenAI-compatible HTTP API over :class:`Engine`.

Endpoints: ``POST /v1/chat/completions`` (one user message whose content holds one image, as a
``data:`` URL or ``htc-image://<id>`` of an upload, and text; ``stream`` gives server-sent events),
``POST /v1/images`` (upload: compress and return the id), ``GET /v1/models``, ``GET /health`` and
``GET /metrics`` (Prometheus text). Every refused request is a 4xx whose body is OpenAI's error
object naming the problem; nothing in a request can name a file on the server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
import uuid
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from ..errors import HTCError
from .engine import Engine, ServeError

CHAT_PARAMS = {"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "stop", "n", "stream",
               "stream_options", "user"}
IMAGE_SCHEME = "htc-image://"


def _error(e: ServeError) -> JSONResponse:
    kind = {400: "invalid_request_error", 404: "invalid_request_error", 413: "invalid_request_error",
            429: "rate_limit_error"}.get(e.status, "server_error")
    headers = {"Retry-After": "1"} if e.status == 429 else None
    return JSONResponse({"error": {"message": str(e), "type": kind, "param": e.param, "code": e.code}},
                        status_code=e.status, headers=headers)


def _json_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise ServeError(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise ServeError("the request body must be a JSON object")
    return body


def _decode_data_url(url: str) -> bytes:
    if not url.startswith("data:") or "," not in url:
        raise ServeError("an image_url must be a data: URL (data:image/png;base64,...) or htc-image://<id>; "
                         "the server fetches nothing", 400, "image_url", "invalid_image_url")
    header, payload = url[5:].split(",", 1)
    if not header.endswith(";base64"):
        raise ServeError("a data: URL image must be base64-encoded", 400, "image_url", "invalid_image_url")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ServeError("the image's base64 data is malformed", 400, "image_url", "invalid_base64") from None


def _positive_int(body: dict, names: tuple[str, ...], default: int, most: int) -> int:
    for name in names:
        if body.get(name) is not None:
            v = body[name]
            if not isinstance(v, int) or isinstance(v, bool) or not 1 <= v <= most:
                raise ServeError(f"{name} must be an integer from 1 to {most}, got {v!r}", param=name)
            return v
    return default


def parse_chat(body: dict, max_tokens: int) -> dict:
    """The question, image reference and settings of a chat-completions request, or a ServeError."""
    unknown = sorted(set(body) - CHAT_PARAMS)
    if unknown:
        raise ServeError(f"unknown parameter(s): {', '.join(unknown)}", param=unknown[0], code="unknown_parameter")
    if body.get("n", 1) != 1:
        raise ServeError("n must be 1 (one answer per request)", param="n")
    temperature = body.get("temperature", 0.0)
    if temperature is None:
        temperature = 0.0
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise ServeError(f"temperature must be a number from 0 to 2, got {temperature!r}", param="temperature")
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ServeError("stop must be a string or a list of up to 4 strings", param="stop")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ServeError("messages must be a non-empty list of message objects", param="messages")
    users = [m for m in messages if m.get("role") == "user"]
    others = {m.get("role") for m in messages} - {"user", "system"}
    if len(users) != 1 or others:
        raise ServeError("send one user message (and optionally a system message, which is ignored): "
                         "multi-turn conversations are not served", param="messages")
    content = users[0].get("content")
    parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
    if not isinstance(parts, list):
        raise ServeError("a message's content must be a string or a list of parts", param="messages")
    texts, images = [], []
    for part in parts:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise ServeError("an image_url part needs image_url.url", param="messages")
            images.append(url)
        else:
            raise ServeError(f"unsupported content part {part!r:.80}: use text and image_url parts", param="messages")
    question = " ".join(t.strip() for t in texts).strip()
    if len(images) != 1:
        raise ServeError(f"a request needs exactly one image, got {len(images)}", param="messages")
    if not question:
        raise ServeError("the user message has no text question", param="messages")
    return {"question": question, "image": images[0], "temperature": float(temperature), "stop": stop,
            "max_tokens": _positive_int(body, ("max_completion_tokens", "max_tokens"), min(32, max_tokens), max_tokens),
            "stream": bool(body.get("stream", False))}


def create_app(engine: Engine, model_name: str):
    """The FastAPI application serving ``engine`` as model ``model_name``."""
    @asynccontextmanager
    async def lifespan(app):
        yield
        engine.close()

    app = FastAPI(title="htc-vlm", docs_url=None, redoc_url=None, lifespan=lifespan)
    reg = CollectorRegistry()
    requests_total = Counter("htc_requests", "Requests by endpoint and status", ["endpoint", "status"], registry=reg)
    latency = Histogram("htc_request_seconds", "Request latency", ["endpoint"], registry=reg,
                        buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
    batch = Histogram("htc_batch_size", "Questions per model call", registry=reg, buckets=(1, 2, 4, 8, 16, 32, 64))
    compress_batch = Histogram("htc_compress_batch_size", "New images per compression call", registry=reg,
                               buckets=(1, 2, 4, 8, 16, 32))
    for name, doc, read in (("htc_cache_hits", "Cache lookups found", lambda: engine.store.stats.hits),
                            ("htc_cache_misses", "Cache lookups missed", lambda: engine.store.stats.misses),
                            ("htc_cache_evictions", "Caches evicted from memory", lambda: engine.store.stats.evictions),
                            ("htc_cache_bytes", "Bytes of caches in memory", lambda: engine.store.stats.bytes),
                            ("htc_cache_entries", "Caches in memory", lambda: engine.store.stats.entries),
                            ("htc_compressions", "Images compressed", lambda: engine.compressions)):
        Gauge(name, doc, registry=reg).set_function(read)
    model_seconds = Gauge("htc_model_seconds", "Seconds the model spent, by kind of call (answer or compress)",
                          ["call"], registry=reg)
    for kind in engine.model_seconds:
        model_seconds.labels(kind).set_function(lambda kind=kind: engine.model_seconds[kind])

    body_limit = 2 * engine.limits.max_image_bytes + 1024 * 1024  # base64 of the largest image, and text

    async def _read(request: Request) -> bytes:
        """The request body, refused with 413 once it passes the limit (never held whole in memory)."""
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > body_limit:
                raise ServeError(f"the request body is over {body_limit} bytes", 413, code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _resolve(url: str):
        """(image id, its cache if this request just made it)."""
        if url.startswith(IMAGE_SCHEME):
            image_id = url[len(IMAGE_SCHEME):]
            return image_id, engine.cache_for(image_id)  # 404 when unknown
        image_id, cache, _ = await engine.add_image(_decode_data_url(url))
        return image_id, cache

    def _observe(endpoint: str, status: int, t0: float) -> None:
        requests_total.labels(endpoint, str(status)).inc()
        latency.labels(endpoint).observe(time.perf_counter() - t0)
        _drain()

    def _drain() -> None:
        """Move the batch sizes the engine saw since the last request into their histograms."""
        for sizes, histogram in ((engine.batch_sizes, batch), (engine.compress_batch_sizes, compress_batch)):
            while sizes:
                histogram.observe(sizes.pop())

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):  # never a traceback in a response
        if isinstance(exc, ServeError):
            return _error(exc)
        if isinstance(exc, HTCError):
            return _error(ServeError(str(exc)))
        return _error(ServeError(f"internal error ({type(exc).__name__}); the server keeps serving", 500))

    @app.post("/v1/images")
    async def upload(request: Request):
        t0 = time.perf_counter()
        try:
            raw = await _read(request)
            if request.headers.get("content-type", "").startswith("application/json"):
                body = _json_body(raw)
                url = body.get("image_url") or body.get("image")
                url = url.get("url") if isinstance(url, dict) else url
                if not isinstance(url, str):
                    raise ServeError("send the image as raw bytes, or JSON {\"image_url\": \"data:...\"}", param="image_url")
                data = _decode_data_url(url)
            else:
                data = raw
            if not data:
                raise ServeError("the request holds no image", param="image_url")
            image_id, _, created = await engine.add_image(data)
        except ServeError as e:
            _observe("images", e.status, t0)
            return _error(e)
        _observe("images", 200, t0)
        return {"id": image_id, "object": "image", "url": IMAGE_SCHEME + image_id, "compressed": created}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        t0 = time.perf_counter()
        pieces = asyncio.Queue()
        try:
            req = parse_chat(_json_body(await _read(request)), engine.limits.max_tokens)
            image_id, cache = await _resolve(req["image"])
            future = engine.submit(image_id, req["question"], req["max_tokens"], req["temperature"], req["stop"],
                                   cache, pieces if req["stream"] else None)
            answer = None if req["stream"] else await future
        except ServeError as e:
            _observe("chat", e.status, t0)
            return _error(e)
        rid, created = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time())
        if not req["stream"]:
            _observe("chat", 200, t0)
            usage = {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                     "total_tokens": answer.prompt_tokens + answer.completion_tokens}
            return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer.text},
                                 "finish_reason": answer.finish_reason}], "usage": usage}

        base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name}

        def chunk(delta: dict, finish: str | None = None) -> str:
            return f"data: {json.dumps(base | {'choices': [{'index': 0, 'delta': delta, 'finish_reason': finish}]})}\n\n"

        async def events():  # each piece as the model writes it; the end when the answer is complete
            yield chunk({"role": "assistant", "content": ""})
            while True:
                get = asyncio.ensure_future(pieces.get())
                await asyncio.wait({get, future}, return_when=asyncio.FIRST_COMPLETED)
                if get.done():
                    yield chunk({"content": get.result()})
                    continue
                get.cancel()
                while not pieces.empty():
                    yield chunk({"content": pieces.get_nowait()})
                break
            try:
                answer = future.result()
            except Exception as e:  # noqa: BLE001 -- the stream has begun: the error is its last event
                status = e.status if isinstance(e, ServeError) else 500
                _observe("chat", status, t0)
                message = str(e) if isinstance(e, HTCError) else f"internal error ({type(e).__name__})"
                yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                return
            _observe("chat", 200, t0)
            yield chunk({}, answer.finish_reason)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "htc-vlm"}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name}

    @app.get("/metrics")
    async def metrics():
        _drain()
        return PlainTextResponse(generate_latest(reg).decode(), media_type=CONTENT_TYPE_LATEST)

    return app


