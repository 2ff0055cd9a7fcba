"""From OpenAI request bodies to engine requests and back: sampling params, prompts, choices,
logprobs, usage, and SSE chunks."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams
from jaxserve.server.errors import APIError, value_error
from jaxserve.server.protocol import ChatCompletionRequest, CompletionRequest

access_log = logging.getLogger("jaxserve.access")


@dataclass(frozen=True)
class ServerConfig:
    model_names: tuple[str, ...]
    max_model_len: int
    api_keys: tuple[str, ...] = ()  # empty: no authentication
    request_timeout: Optional[float] = None  # seconds for a whole request
    max_logprobs: int = 20
    rate_limit_rps: Optional[float] = None  # per API key (or client address without keys)
    rate_limit_burst: int = 20
    log_prompts: bool = False


MAX_N = 128  # samples per request


def check_unsupported(body) -> None:
    """Refuse what would otherwise be answered as if it had not been asked: structured outputs
    (JSON mode, JSON schema, vLLM's guided decoding) and tool / function calling."""
    rf = body.response_format
    if rf is not None and rf.get("type", "text") != "text":
        raise APIError(400, f"response_format type {rf.get('type')!r} is not supported: this server has no "
                            f"structured-output decoding; ask for JSON in the prompt and validate the reply, or "
                            f"leave response_format out (or {{'type': 'text'}})", "response_format")
    for name in ("guided_json", "guided_regex", "guided_choice", "guided_grammar"):
        if getattr(body, name) is not None:
            raise APIError(400, f"{name} is not supported: this server has no guided (constrained) decoding", name)
    for name in ("tools", "functions"):
        if getattr(body, name, None):
            choice = getattr(body, "tool_choice" if name == "tools" else "function_call")
            if choice != "none":
                raise APIError(400, f"{name} (function calling) is not supported by this server; send the request "
                                    f"without {name}, or with {'tool_choice' if name == 'tools' else 'function_call'}"
                                    f"='none'", name)


def prediction_text(pred: Optional[dict]) -> Optional[str]:
    """OpenAI's `prediction` -> the expected text (a speculation source; the output never changes)."""
    if pred is None:
        return None
    content = pred.get("content")
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                   for p in content):
            content = None
        else:
            content = "".join(p["text"] for p in content)
    if pred.get("type") != "content" or not isinstance(content, str):
        raise APIError(400, "prediction must be {'type': 'content', 'content': a string or a list of "
                            "{'type': 'text', 'text': ...} parts}", "prediction")
    return content or None


def sampling_params(body, max_tokens: Optional[int], logprobs: Optional[int]) -> SamplingParams:
    check_unsupported(body)
    if not 1 <= body.n <= MAX_N:
        raise APIError(400, f"n must be in [1, {MAX_N}], got {body.n}", "n")
    try:
        return SamplingParams(
            n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k or 0, min_p=body.min_p,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
            repetition_penalty=body.repetition_penalty, seed=body.seed, max_tokens=max_tokens,
            min_tokens=body.min_tokens, stop=body.stop, stop_token_ids=body.stop_token_ids,
            ignore_eos=body.ignore_eos, logprobs=logprobs,
            logit_bias={int(k): v for k, v in body.logit_bias.items()} if body.logit_bias else None,
            skip_special_tokens=body.skip_special_tokens,
            include_stop_str_in_output=body.include_stop_str_in_output, priority=body.priority,
            prediction=prediction_text(body.prediction))
    except ValueError as e:
        raise value_error(e) from e
    except (TypeError, OverflowError) as e:
        raise APIError(400, f"invalid sampling parameter: {e}") from e


class Serving:
    def __init__(self, llm: AsyncLLM, cfg: ServerConfig, metrics):
        self.llm = llm
        self.cfg = cfg
        self.metrics = metrics

    @property
    def engine(self):
        return self.llm.engine

    def check_model(self, model: Optional[str]) -> str:
        if model is not None and model not in self.cfg.model_names:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {list(self.cfg.model_names)}",
                           "model", "model_not_found")
        return self.cfg.model_names[0]

    def _check_len(self, n_prompt: int, max_tokens: Optional[int]) -> None:
        L = self.cfg.max_model_len
        if n_prompt >= L:
            raise APIError(400, f"this model's maximum context length is {L} tokens; the prompt has {n_prompt} "
                                f"tokens (at most {L - 1} leave room for one generated token)", "prompt")
        if max_tokens is not None and n_prompt + max_tokens > L:
            raise APIError(400, f"this model's maximum context length is {L} tokens; the prompt has {n_prompt} "
                                f"tokens and max_tokens is {max_tokens}: lower max_tokens to at most "
                                f"{L - n_prompt}", "max_tokens")

    def _check_logprobs(self, k: Optional[int], name: str) -> None:
        if k is not None and not 0 <= k <= self.cfg.max_logprobs:
            raise APIError(400, f"{name} must be in [0, {self.cfg.max_logprobs}], got {k}", name)

    # ---- prompts ----------------------------------------------------------------------------
    def completion_prompts(self, body: CompletionRequest) -> list[tuple[Optional[str], list[int]]]:
        p = body.prompt
        tok = self.engine.tokenizer
        vocab = self.engine.model.arch.vocab_size
        if isinstance(p, str):
            items = [p]
        elif not p:
            raise APIError(400, "prompt must not be empty", "prompt")
        elif all(isinstance(x, int) for x in p):
            items = [list(p)]
        elif all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p):
            items = list(p)
        else:
            raise APIError(400, "prompt must be a string, a list of strings, a list of token ids or a list "
                                "of token-id lists (not a mix)", "prompt")
        out = []
        for it in items:
            if isinstance(it, str):
                ids = tok.encode(it)
                out.append((it, ids))
            else:
                if not it:
                    raise APIError(400, "a token-id prompt must not be empty", "prompt")
                if any(not 0 <= t < vocab for t in it):
                    raise APIError(400, f"prompt token ids must be in [0, {vocab})", "prompt")
                out.append((None, list(it)))
        if any(len(ids) == 0 for _, ids in out):
            raise APIError(400, "the prompt encodes to zero tokens", "prompt")
        return out

    def chat_prompt(self, body: ChatCompletionRequest) -> list[int]:
        if not body.messages:
            raise APIError(400, "messages must not be empty", "messages")
        msgs = []
        for m in body.messages:
            if m.role not in ("system", "user", "assistant", "developer", "tool"):
                raise APIError(400, f"unknown message role {m.role!r}", "messages")
            content = m.content
            if isinstance(content, list):
                content = "".join(part.text or "" for part in content if part.type == "text")
            msgs.append({"role": "system" if m.role == "developer" else m.role, "content": content or ""})
        try:
            return self.engine.apply_chat_template(msgs, add_generation_prompt=body.add_generation_prompt,
                                                   chat_template=body.chat_template)
        except ValueError as e:
            raise value_error(e) from e
        except Exception as e:  # a template that fails to render is the request's fault
            raise APIError(400, f"the chat template failed to render these messages: {e}", "messages") from e

    # ---- running ----------------------------------------------------------------------------
    async def _stream_one(self, rid: str, prompt, ids, params, priority) -> AsyncIterator[RequestOutput]:
        try:
            async for out in self.llm.generate(prompt, params, rid, prompt_token_ids=ids, priority=priority):
                yield out
        except ValueError as e:
            raise value_error(e) from e

    async def run_all(self, rid: str, prompts, params, priority) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Merge the output streams of several prompts: yields (prompt index, cumulative output)."""
        if len(prompts) == 1:
            async for o in self._stream_one(rid, prompts[0][0], prompts[0][1], params, priority):
                yield 0, o
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i, text, ids):
            try:
                async for o in self._stream_one(f"{rid}-p{i}", text, ids, params, priority):
                    await q.put((i, o))
            except BaseException as e:
                await q.put((i, e))
            finally:
                await q.put((i, None))

        tasks = [asyncio.create_task(pump(i, t, ids)) for i, (t, ids) in enumerate(prompts)]
        live = len(tasks)
        try:
            while live:
                i, item = await q.get()
                if item is None:
                    live -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()

    def timeout_ctx(self):
        t = self.cfg.request_timeout
        return asyncio.timeout(t) if t else _nullctx()

    def log_access(self, rid: str, n_prompt: int, outs: list[RequestOutput], t0: float, status="ok",
                   prompt: Optional[str] = None) -> None:
        now = time.time()
        n_out = sum(len(c.token_ids) for o in outs for c in o.outputs)
        ttft = None
        for o in outs:
            if o.metrics and o.metrics.first_token_time:
                ttft = o.metrics.first_token_time - t0 if ttft is None else min(ttft, o.metrics.first_token_time - t0)
        reasons = ",".join(sorted({str(c.finish_reason) for o in outs for c in o.outputs}))
        extra = {"request_id": rid, "prompt_tokens": n_prompt, "output_tokens": n_out,
                 "ttft_s": round(ttft, 4) if ttft is not None else None, "latency_s": round(now - t0, 4),
                 "finish_reason": reasons or None}
        if self.cfg.log_prompts and prompt is not None:
            extra["prompt"] = prompt
        access_log.info("request_id=%s status=%s prompt_tokens=%d output_tokens=%d ttft_s=%s latency_s=%.3f "
                        "finish_reason=%s%s", rid, status, n_prompt, n_out,
                        f"{ttft:.3f}" if ttft is not None else "-", now - t0, reasons or "-",
                        f" prompt={prompt!r}" if self.cfg.log_prompts and prompt is not None else "",
                        extra={"fields": extra})
        if self.metrics is not None and status == "ok":
            for o in outs:
                for c in o.outputs:
                    self.metrics.observe(ttft, now - t0, len(c.token_ids), c.finish_reason)


class _nullctx:
    async def __aenter__(self):
        return self

    async def __aexit__(self, *a):
        return False


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


SSE_DONE = b"data: [DONE]\n\n"


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


def completion_logprobs(tok, c, start_text_offset: int, from_index: int = 0) -> dict:
    """Legacy completions format for c.logprobs[from_index:]."""
    tokens, lps, tops, offsets = [], [], [], []
    off = start_text_offset
    for tid, d in zip(c.token_ids[from_index:], (c.logprobs or [])[from_index:]):
        s = tok.decode([tid])
        tokens.append(s)
        lps.append(d[tid].logprob if tid in d else None)
        tops.append({v.decoded_token or tok.decode([k]): v.logprob for k, v in d.items()})
        offsets.append(off)
        off += len(s)
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(tok, c, top_n: int, from_index: int = 0) -> dict:
    content = []
    for tid, d in zip(c.token_ids[from_index:], (c.logprobs or [])[from_index:]):
        s = tok.decode([tid])
        alts = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append({"token": s, "logprob": d[tid].logprob if tid in d else None, "bytes": list(s.encode()),
                        "top_logprobs": [{"token": v.decoded_token or tok.decode([k]), "logprob": v.logprob,
                                          "bytes": list((v.decoded_token or "").encode())} for k, v in alts]})
    return {"content": content}
