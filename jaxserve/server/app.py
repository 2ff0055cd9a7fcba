"""The Litestar app: OpenAI routes, SSE streaming, health/readiness, Prometheus metrics."""
from __future__ import annotations

import hmac
import math
import time
from typing import Any, AsyncIterator

from litestar import Litestar, Request, Response, get, post
from litestar.openapi import OpenAPIConfig
from litestar.response import Stream

from jaxserve import __version__
from jaxserve.engine.async_engine import AsyncLLM, EngineDeadError, OverloadedError
from jaxserve.server.errors import EXCEPTION_HANDLERS, APIError, error_response
from jaxserve.server.metrics import Metrics
from jaxserve.server.rate_limit import TokenBucketLimiter
from jaxserve.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                      TokenizeRequest)
from jaxserve.server.serving import (SSE_DONE, Serving, ServerConfig, chat_logprobs, completion_logprobs,
                                     new_id, sampling_params, sse, usage)


def _check_auth(request: Request, cfg: ServerConfig, limiter=None) -> None:
    """API key check, then the per-key rate limit (token bucket) for /v1/* and tokenizer routes."""
    key = None
    if cfg.api_keys:
        got = request.headers.get("authorization", "")
        key = next((k for k in cfg.api_keys if hmac.compare_digest(got.encode(), f"Bearer {k}".encode())), None)
        if key is None:
            raise APIError(401, "invalid or missing API key (send Authorization: Bearer <key>)", None,
                           "invalid_api_key")
    if limiter is not None:
        who = key or (request.client.host if request.client else "unknown")
        wait = limiter.take(who)
        if wait > 0:
            raise APIError(429, f"rate limit exceeded ({cfg.rate_limit_rps:g} requests/s, burst "
                                f"{cfg.rate_limit_burst}); retry after {wait:.2f} s", None, "rate_limit_exceeded",
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})


def _overloaded(e: Exception) -> APIError:
    return APIError(503, f"server overloaded: {e}", None, "overloaded", headers={"Retry-After": "1"})


def create_app(llm: AsyncLLM, cfg: ServerConfig) -> Litestar:
    metrics = Metrics(llm, cfg.model_names[0])
    serving = Serving(llm, cfg, metrics)
    limiter = TokenBucketLimiter(cfg.rate_limit_rps, cfg.rate_limit_burst) if cfg.rate_limit_rps else None
    def _auth(request, cfg):
        _check_auth(request, cfg, limiter)

    def engine_or_503():
        if llm.load_error is not None:
            raise APIError(503, f"the engine failed to start: {llm.load_error}", None, "engine_dead")
        if llm.engine is None:
            raise APIError(503, "the model is still loading", None, "not_ready", headers={"Retry-After": "5"})
        return llm.engine

    # ---- completions ------------------------------------------------------------------------
    @post("/v1/completions", status_code=200, summary="Create a completion")
    async def completions(request: Request, data: CompletionRequest) -> Any:
        _auth(request, cfg)
        engine_or_503()
        model = serving.check_model(data.model)
        if data.suffix:
            raise APIError(400, "suffix is not supported", "suffix")
        if data.best_of is not None and data.best_of != data.n:
            raise APIError(400, "best_of other than n is not supported", "best_of")
        serving._check_logprobs(data.logprobs, "logprobs")
        prompts = serving.completion_prompts(data)
        for _, ids in prompts:
            serving._check_len(len(ids), data.max_tokens)
        params = sampling_params(data, data.max_tokens, data.logprobs)
        rid = new_id("cmpl")
        created = int(time.time())
        tok = llm.engine.tokenizer
        n = params.n
        n_prompt = sum(len(ids) for _, ids in prompts)
        t0 = time.time()

        def prefix(i):
            return (prompts[i][0] if prompts[i][0] is not None else tok.decode(prompts[i][1])) if data.echo else ""

        if data.stream:
            first, gen = await _start_stream(serving, rid, prompts, params, data.priority)

            async def events() -> AsyncIterator[bytes]:
                sent_text = {}
                sent_tok = {}
                finals = {}
                n_out = 0
                try:
                    async with serving.timeout_ctx():
                        async for i, out in _chain(first, gen):
                            for c in out.outputs:
                                key = i * n + c.index
                                old_t = sent_text.get(key, 0)
                                old_k = sent_tok.get(key, 0)
                                delta = c.text[old_t:]
                                fin = c.finish_reason
                                if not delta and fin is None and key in sent_text:
                                    continue
                                if key not in sent_text:
                                    delta = prefix(i) + delta
                                choice = {"index": key, "text": delta, "logprobs": None, "finish_reason": fin,
                                          "stop_reason": c.stop_reason if fin else None}
                                if data.logprobs is not None:
                                    choice["logprobs"] = completion_logprobs(tok, c, old_t, old_k)
                                sent_text[key] = len(c.text)
                                sent_tok[key] = len(c.token_ids)
                                chunk = {"id": rid, "object": "text_completion", "created": created, "model": model,
                                         "choices": [choice]}
                                if data.stream_options and data.stream_options.continuous_usage_stats:
                                    chunk["usage"] = usage(n_prompt, sum(sent_tok.values()))
                                yield sse(chunk)
                            if out.finished:
                                finals[i] = out
                                n_out += sum(len(c.token_ids) for c in out.outputs)
                except (TimeoutError, APIError) as e:
                    yield _sse_error(e)
                if data.stream_options and data.stream_options.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": model,
                               "choices": [], "usage": usage(n_prompt, n_out)})
                yield SSE_DONE
                serving.log_access(rid, n_prompt, list(finals.values()), t0)

            return Stream(events(), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        finals = await _collect(serving, rid, prompts, params, data.priority)
        choices = []
        n_out = 0
        for i, out in sorted(finals.items()):
            for c in out.outputs:
                n_out += len(c.token_ids)
                choices.append({"index": i * n + c.index, "text": prefix(i) + c.text,
                                "logprobs": completion_logprobs(tok, c, len(prefix(i))) if data.logprobs is not None else None,
                                "finish_reason": c.finish_reason, "stop_reason": c.stop_reason})
        serving.log_access(rid, n_prompt, list(finals.values()), t0,
                           prompt=prompts[0][0] if len(prompts) == 1 else None)
        return {"id": rid, "object": "text_completion", "created": created, "model": model, "choices": choices,
                "usage": usage(n_prompt, n_out)}

    # ---- chat -------------------------------------------------------------------------------
    @post("/v1/chat/completions", status_code=200, summary="Create a chat completion")
    async def chat(request: Request, data: ChatCompletionRequest) -> Any:
        _auth(request, cfg)
        engine_or_503()
        model = serving.check_model(data.model)
        top = data.top_logprobs
        if top is not None and not data.logprobs:
            raise APIError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        serving._check_logprobs(top, "top_logprobs")
        ids = serving.chat_prompt(data)
        max_tokens = data.max_completion_tokens if data.max_completion_tokens is not None else data.max_tokens
        if max_tokens is None:
            serving._check_len(len(ids), None)
        else:
            serving._check_len(len(ids), max_tokens)
        params = sampling_params(data, max_tokens, (top or 0) if data.logprobs else None)
        rid = new_id("chatcmpl")
        created = int(time.time())
        tok = llm.engine.tokenizer
        t0 = time.time()
        prompts = [(None, ids)]

        if data.stream:
            first, gen = await _start_stream(serving, rid, prompts, params, data.priority)

            async def events() -> AsyncIterator[bytes]:
                sent_text, sent_tok = {}, {}
                final = None
                base = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model}
                try:
                    async with serving.timeout_ctx():
                        async for _, out in _chain(first, gen):
                            for c in out.outputs:
                                k = c.index
                                if k not in sent_text:
                                    yield sse({**base, "choices": [{"index": k, "delta": {"role": "assistant", "content": ""},
                                                                    "logprobs": None, "finish_reason": None}]})
                                    sent_text[k], sent_tok[k] = 0, 0
                                delta = c.text[sent_text[k]:]
                                if not delta and c.finish_reason is None:
                                    continue
                                choice = {"index": k, "delta": {"content": delta} if delta else {},
                                          "logprobs": chat_logprobs(tok, c, top or 0, sent_tok[k]) if data.logprobs else None,
                                          "finish_reason": c.finish_reason}
                                sent_text[k], sent_tok[k] = len(c.text), len(c.token_ids)
                                yield sse({**base, "choices": [choice]})
                            if out.finished:
                                final = out
                except (TimeoutError, APIError) as e:
                    yield _sse_error(e)
                if data.stream_options and data.stream_options.include_usage:
                    n_out = sum(len(c.token_ids) for c in final.outputs) if final else 0
                    yield sse({**base, "choices": [], "usage": usage(len(ids), n_out)})
                yield SSE_DONE
                serving.log_access(rid, len(ids), [final] if final else [], t0)

            return Stream(events(), media_type="text/event-stream",
                          headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        finals = await _collect(serving, rid, prompts, params, data.priority)
        out = finals[0]
        choices = [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                    "logprobs": chat_logprobs(tok, c, top or 0) if data.logprobs else None,
                    "finish_reason": c.finish_reason, "stop_reason": c.stop_reason} for c in out.outputs]
        serving.log_access(rid, len(ids), [out], t0)
        return {"id": rid, "object": "chat.completion", "created": created, "model": model, "choices": choices,
                "usage": usage(len(ids), sum(len(c.token_ids) for c in out.outputs))}

    # ---- the rest ---------------------------------------------------------------------------
    @get("/v1/models", summary="List models")
    async def models(request: Request) -> dict:
        _auth(request, cfg)
        return {"object": "list", "data": [{"id": m, "object": "model", "created": int(time.time()),
                                            "owned_by": "jaxserve", "root": m, "max_model_len": cfg.max_model_len}
                                           for m in cfg.model_names]}

    @post("/tokenize", status_code=200, summary="Tokenize a prompt or chat messages")
    async def tokenize(request: Request, data: TokenizeRequest) -> dict:
        _auth(request, cfg)
        eng = engine_or_503()
        serving.check_model(data.model)
        if (data.prompt is None) == (data.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", "prompt")
        if data.prompt is not None:
            ids = eng.tokenizer.encode(data.prompt, add_special_tokens=data.add_special_tokens)
        else:
            ids = serving.chat_prompt(ChatCompletionRequest(messages=data.messages,
                                                            add_generation_prompt=data.add_generation_prompt))
        return {"tokens": list(ids), "count": len(ids), "max_model_len": cfg.max_model_len}

    @post("/detokenize", status_code=200, summary="Detokenize token ids")
    async def detokenize(request: Request, data: DetokenizeRequest) -> dict:
        _auth(request, cfg)
        eng = engine_or_503()
        serving.check_model(data.model)
        vocab = eng.model.arch.vocab_size
        if any(not 0 <= t < vocab for t in data.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", "tokens")
        return {"prompt": eng.tokenizer.decode(data.tokens)}

    @get("/version", summary="Server version")
    async def version() -> dict:
        return {"version": __version__}

    @get("/health", summary="Liveness: the engine thread is alive")
    async def health() -> Response:
        if llm.is_alive:
            return Response(content={"status": "ok"}, status_code=200)
        return error_response(503, f"engine is not alive: {llm.load_error}", code="engine_dead")

    @get("/ready", summary="Readiness: model loaded and warmed up, and not shutting down")
    async def ready() -> Response:
        if llm.is_ready:
            return Response(content={"status": "ready"}, status_code=200)
        return error_response(503, "not ready", code="not_ready", headers={"Retry-After": "5"})

    @get("/metrics", summary="Prometheus metrics", media_type="text/plain")
    async def prom() -> Response:
        return Response(content=metrics.render(), media_type="text/plain; version=0.0.4")

    @get("/openapi.json", summary="The OpenAPI schema", include_in_schema=False)
    async def openapi_json(request: Request) -> dict:
        return request.app.openapi_schema.to_schema()

    def on_shutdown() -> None:
        llm.start_draining()

    app = Litestar(
        on_shutdown=[on_shutdown],
        route_handlers=[completions, chat, models, tokenize, detokenize, version, health, ready, prom,
                        openapi_json],
        exception_handlers=EXCEPTION_HANDLERS,
        openapi_config=OpenAPIConfig(title="jaxserve", version=__version__, path="/openapi"),
        request_max_body_size=32 * 1024 * 1024,
    )
    app.state.metrics = metrics
    app.state.llm = llm
    return app


async def _start_stream(serving: Serving, rid, prompts, params, priority):
    try:
        gen = serving.run_all(rid, prompts, params, priority)
        return await _first(gen), gen
    except (OverloadedError, EngineDeadError) as e:
        raise _overloaded(e) from e


def _sse_error(e: Exception) -> bytes:
    """An error after the stream started: one SSE event in the OpenAI error shape."""
    if isinstance(e, APIError):
        return sse({"error": {"message": e.message, "type": "invalid_request_error", "param": e.param,
                              "code": e.status}})
    return sse({"error": {"message": "request timed out", "type": "timeout_error", "param": None, "code": 408}})


async def _first(gen):
    """Start a stream and wait for its first output, so errors (bad prompt, overload) become HTTP
    statuses before any SSE byte is sent."""
    try:
        return await gen.__anext__()
    except StopAsyncIteration:
        return None


async def _chain(first, gen):
    if first is not None:
        yield first
        async for x in gen:
            yield x


async def _collect(serving: Serving, rid, prompts, params, priority) -> dict:
    finals = {}
    try:
        async with serving.timeout_ctx():
            async for i, out in serving.run_all(rid, prompts, params, priority):
                if out.finished:
                    finals[i] = out
    except (OverloadedError, EngineDeadError) as e:
        raise _overloaded(e) from e
    except TimeoutError:
        raise APIError(408, f"request timed out after {serving.cfg.request_timeout} s", None, "timeout") from None
    return finals
