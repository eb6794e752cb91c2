"""OpenAI-compatible HTTP API over the engine (FastAPI).

    POST /v1/completions, /v1/chat/completions   ``model`` = an adapter name or the base model's name;
                                                 ``stream: true`` answers with server-sent events
    GET  /v1/models                              what the caller's key may use
    POST /admin/adapters {"name", "path"}        hot load (path inside --adapter-root); DELETE /admin/adapters/{name};
                                                 GET /admin/adapters (method, slot, load time, LoRA conversion error)
    GET  /health, /metrics (Prometheus text)

Errors use OpenAI's shape ``{"error": {"message", "type", "code"}}``: 400 bad input or over a limit,
401 no/unknown key, 403 adapter of another tenant, 404 unknown model, 429 queue full, 503 shutting down.
"""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request as HttpRequest
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from peftlab.core.state import CheckpointError
from peftlab.serve.auth import OPEN, AuthError, KeyRing, Tenant
from peftlab.serve.engine import Engine, EngineStopped, QueueFull, Request
from peftlab.serve.sampling import SamplingParams
from peftlab.serve.store import AdapterNotFound, ServeError


MAX_CHARS_PER_TOKEN = 64  # a prompt longer than this many characters per allowed token is refused untokenized


@dataclass
class Limits:
    max_tokens: int = 1024  # per request
    max_prompt_tokens: int = 4096
    default_max_tokens: int = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code = status, message, kind, code


def _error(status: int, message: str, kind: str, code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "code": code}}, status_code=status)


def _field(body: dict, key: str, kinds: tuple, default: Any = None) -> Any:
    value = body.get(key, default)
    if value is not None and (not isinstance(value, kinds) or isinstance(value, bool) and bool not in kinds):
        raise ApiError(400, f"'{key}' must be of type {' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def create_app(engine: Engine, tokenizer, base_name: str = "base", keys: KeyRing | None = None,
               limits: Limits | None = None) -> FastAPI:
    limits = limits or Limits()
    generation = getattr(getattr(engine.model, "generation_config", None), "eos_token_id", None)
    candidates = [tokenizer.eos_token_id, *(generation if isinstance(generation, (list, tuple)) else [generation])]
    eos = {t for t in candidates if isinstance(t, int)}  # generation configs may list several (Llama 3)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop, True)  # graceful: running and queued requests finish

    app = FastAPI(title="peftlab serve", lifespan=lifespan)

    @app.exception_handler(ApiError)
    async def api_error(_, exc: ApiError):
        return _error(exc.status, exc.message, exc.kind, exc.code)

    @app.exception_handler(AuthError)
    async def auth_error(_, exc: AuthError):
        return _error(exc.status, exc.message, "authentication_error" if exc.status == 401 else "permission_error")

    def tenant_of(http: HttpRequest) -> Tenant:
        return OPEN if keys is None else keys.authenticate(http.headers.get("authorization"))

    def adapter_for(tenant: Tenant, model: Any) -> str | None:
        if not isinstance(model, str) or not model:
            raise ApiError(400, "'model' must name an adapter or the base model")
        is_base = model in (base_name, "base")  # "base" always names the base model (no adapter may take it)
        if not tenant.allows("base" if is_base else model):
            raise AuthError(403, f"model {model!r} is not available to this API key")
        if not is_base and not engine.store.known(model):
            raise ApiError(404, f"model {model!r} does not exist", "invalid_request_error", "model_not_found")
        return None if is_base else model

    def message_text(m: Any) -> str | None:
        """A message's content: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
        content = m.get("content") if isinstance(m, dict) and isinstance(m.get("role"), str) else None
        if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                             and isinstance(p.get("text"), str) for p in content):
            return "".join(p["text"] for p in content)
        return content if isinstance(content, str) else None

    def encode_prompt(body: dict, chat: bool) -> list[int]:
        if chat:
            messages = body.get("messages")
            texts = [message_text(m) for m in messages] if isinstance(messages, list) else []
            if not texts or any(t is None for t in texts):
                raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects with text content")
            if not getattr(tokenizer, "chat_template", None):
                raise ApiError(400, "this model's tokenizer has no chat template; use /v1/completions")
            text = sum(len(t) for t in texts)
            messages = [{"role": m["role"], "content": t} for m, t in zip(messages, texts)]
        else:
            prompt = body.get("prompt")
            if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = prompt[0]
            if not isinstance(prompt, str) or not prompt:
                raise ApiError(400, "'prompt' must be a non-empty string (one prompt per request)")
            text = len(prompt)
        if text > limits.max_prompt_tokens * MAX_CHARS_PER_TOKEN:  # refuse before spending time tokenizing
            raise ApiError(400, f"prompt is {text} characters, over the limit of {limits.max_prompt_tokens} tokens",
                           code="context_length_exceeded")
        if chat:
            ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        else:
            ids = tokenizer(prompt)["input_ids"]
        ids = list(ids)
        if len(ids) > limits.max_prompt_tokens:
            raise ApiError(400, f"prompt is {len(ids)} tokens, over the limit of {limits.max_prompt_tokens}",
                           code="context_length_exceeded")
        return ids

    def build_request(body: dict, chat: bool) -> tuple[Request, list[str]]:
        if _field(body, "n", (int,), 1) != 1:
            raise ApiError(400, "'n' must be 1")
        max_tokens = _field(body, "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens",
                            (int,), limits.default_max_tokens)
        if max_tokens < 1 or max_tokens > limits.max_tokens:
            raise ApiError(400, f"max_tokens must be between 1 and {limits.max_tokens}, got {max_tokens}")
        stop = body.get("stop") or []
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 4:
            raise ApiError(400, "'stop' must be a string or a list of up to 4 non-empty strings")
        try:
            params = SamplingParams(float(_field(body, "temperature", (int, float), 1.0)),
                                    float(_field(body, "top_p", (int, float), 1.0)), _field(body, "seed", (int,)))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        return Request(encode_prompt(body, chat), None, max_tokens, params, frozenset(eos)), stop

    async def run(http: HttpRequest, chat: bool):
        tenant = tenant_of(http)
        try:
            body = await http.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        adapter = adapter_for(tenant, body.get("model"))
        req, stop = build_request(body, chat)
        req.adapter = adapter
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        req.on_event = lambda tok, reason: loop.call_soon_threadsafe(events.put_nowait, (tok, reason))  # engine thread
        try:
            engine.submit(req)
        except QueueFull as exc:
            raise ApiError(429, f"server busy: {exc}; retry later", "rate_limit_error") from None
        except EngineStopped as exc:
            raise ApiError(503, str(exc), "server_error") from None
        except AdapterNotFound:
            raise ApiError(404, f"model {adapter!r} does not exist", code="model_not_found") from None
        except ValueError as exc:
            raise ApiError(400, str(exc), code="context_length_exceeded") from None
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        stream = Decoder(tokenizer, req, stop)
        model = body["model"]
        created = int(time.time())

        def chunk(text: str, reason: str | None) -> dict:
            if chat:
                choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": reason}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": model,
                    "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": None}]}

        async def events_until_done():
            try:
                while True:
                    tok, reason = await events.get()
                    if reason is not None:
                        if req.error:
                            raise ApiError(500, req.error, "server_error")
                        yield stream.flush(), stream.reason or ("stop" if reason == "cancelled" else reason)
                        return
                    text = stream.push(tok)
                    if stream.reason:  # a stop string: end now, tell the engine
                        req.cancelled = True
                    if text:
                        yield text, None
            finally:
                req.cancelled = req.cancelled or not req.done.is_set()  # client went away

        def usage() -> dict:
            return {"prompt_tokens": len(req.prompt), "completion_tokens": len(req.output),
                    "total_tokens": len(req.prompt) + len(req.output)}

        if body.get("stream"):
            async def sse():
                if chat:
                    first = chunk("", None)
                    first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                    yield f"data: {json.dumps(first)}\n\n"
                try:
                    async for text, reason in events_until_done():
                        if text or reason:
                            yield f"data: {json.dumps(chunk(text, reason))}\n\n"
                except ApiError as exc:
                    yield f"data: {json.dumps({'error': {'message': exc.message, 'type': exc.kind}})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        parts, final = [], None
        async for text, reason in events_until_done():
            parts.append(text)
            final = reason or final
        text = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": final}
            return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": [choice],
                    "usage": usage()}
        return {"id": rid, "object": "text_completion", "created": created, "model": model,
                "choices": [{"index": 0, "text": text, "finish_reason": final, "logprobs": None}], "usage": usage()}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        return await run(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        return await run(http, chat=True)

    @app.get("/v1/models")
    async def models(http: HttpRequest):
        tenant = tenant_of(http)
        names = [base_name] if tenant.allows("base") else []
        names += [n for n in engine.store.names() if tenant.allows(n) and engine.store.known(n)]
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "peftlab"}
                                           for n in names]}

    def admin(http: HttpRequest) -> None:
        if not tenant_of(http).admin:
            raise AuthError(403, "this API key may not load or unload adapters")

    @app.post("/admin/adapters")
    async def load_adapter(http: HttpRequest):
        admin(http)
        body = await http.json()
        name, path = body.get("name") if isinstance(body, dict) else None, body.get("path") if isinstance(body, dict) else None
        if not isinstance(name, str) or not isinstance(path, str):
            raise ApiError(400, "body must be {\"name\": str, \"path\": str}")
        if name == base_name:
            raise ApiError(400, f"{name!r} is the base model's name")
        try:
            engine.store.register(name, path)
        except PermissionError as exc:
            raise AuthError(403, str(exc)) from None
        except (CheckpointError, ServeError, ValueError) as exc:
            raise ApiError(400, str(exc)) from None
        future = engine.store.prefetch(name)
        if future is not None:  # answer once it is loaded (or why it cannot be)
            try:
                await asyncio.wrap_future(future)
            except Exception as exc:
                engine.store.unload(name)
                raise ApiError(400, f"adapter {name!r} cannot be served: {exc}") from None
        return {"loaded": name, **engine.store.describe(name)}

    @app.get("/admin/adapters")
    async def list_adapters(http: HttpRequest):
        admin(http)
        return {"adapters": [engine.store.describe(n) for n in engine.store.names()]}

    @app.delete("/admin/adapters/{name}")
    async def unload_adapter(name: str, http: HttpRequest):
        admin(http)
        try:
            engine.store.unload(name)
        except AdapterNotFound:
            raise ApiError(404, f"no adapter named {name!r}", code="model_not_found") from None
        return {"unloaded": name}

    @app.get("/health")
    async def health():
        status = "ok" if engine.accepting else "shutting_down"
        return JSONResponse({"status": status, "running": len(engine.running), "waiting": len(engine.waiting)},
                            status_code=200 if engine.accepting else 503)

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine), media_type="text/plain; version=0.0.4")

    return app


class Decoder:
    """Incremental detokenisation for streaming, with stop strings (the stop token itself is never shown)."""

    def __init__(self, tokenizer, req: Request, stop: list[str]):
        self.tokenizer, self.req, self.stop = tokenizer, req, stop
        self.ids: list[int] = []
        self.sent = 0
        self.text = ""
        self.reason: str | None = None

    def push(self, token: int) -> str:
        if self.reason or token in self.req.stop_ids:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            at = text.find(s)
            if at >= 0:
                text, self.reason = text[:at], "stop"
        self.text = text
        if text.endswith("\ufffd") and not self.reason:
            return ""  # an incomplete multi-byte character: wait for the next token
        keep = max((len(s) - 1 for s in self.stop), default=0) if not self.reason else 0
        upto = max(self.sent, len(text) - keep)
        out, self.sent = text[self.sent:upto], upto
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


def prometheus_text(engine: Engine) -> str:
    m, st = engine.metrics, engine.store.stats
    cold = st["cold_load_ms_sum"] / st["cold_load_count"] if st["cold_load_count"] else 0.0
    rows = [
        ("queue_depth", "gauge", "requests waiting to be admitted", len(engine.waiting)),
        ("running_requests", "gauge", "requests in the running batch", len(engine.running)),
        ("requests_total", "counter", "requests accepted", m["requests_total"]),
        ("requests_finished_total", "counter", "requests finished", m["requests_finished"]),
        ("requests_failed_total", "counter", "requests that ended in an error", m["requests_failed"]),
        ("prompt_tokens_total", "counter", "prompt tokens prefilled", m["prompt_tokens"]),
        ("generated_tokens_total", "counter", "tokens generated", m["generated_tokens"]),
        ("step_seconds_total", "counter", "time spent in engine steps", round(m["step_seconds"], 6)),
        ("tokens_per_second", "gauge", "generated tokens per second, last 10 s", round(engine.tokens_per_second(), 3)),
        ("adapter_gpu_hits_total", "counter", "requests whose adapter was already in a GPU slot", st["gpu_hits"]),
        ("adapter_cpu_hits_total", "counter", "slot loads served from the CPU cache", st["cpu_hits"]),
        ("adapter_disk_loads_total", "counter", "adapters read from disk", st["disk_loads"]),
        ("adapter_evictions_total", "counter", "idle adapters evicted from GPU slots", st["evictions"]),
        ("adapter_slots_used", "gauge", "GPU adapter slots in use", engine.store.slots_used()),
        ("adapter_slots_total", "gauge", "GPU adapter slots", engine.store.max_gpu),
        ("adapter_cpu_cached", "gauge", "adapters in the CPU cache", len(engine.store.cpu)),
        ("adapter_slot_load_ms_avg", "gauge", "mean time to put an adapter into a GPU slot", round(cold, 3)),
        ("kv_free_blocks", "gauge", "free KV cache blocks", engine.cache.free_blocks),
    ]
    lines = []
    for name, kind, help_text, value in rows:
        lines += [f"# HELP peftlab_{name} {help_text}", f"# TYPE peftlab_{name} {kind}", f"peftlab_{name} {value}"]
    return "\n".join(lines) + "\n"
