"""Online benchmark against a running OpenAI-compatible server (like `vllm bench serve`):
Poisson (gamma, with burstiness) arrivals, optional max concurrency, streamed completions;
reports request and token throughput and mean / median / p99 of TTFT, TPOT and inter-token latency.
"""
from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from jaxserve.bench.datasets import BenchRequest


@dataclass
class _Result:
    ok: bool
    ttft: float = 0.0
    latency: float = 0.0
    itls: list = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str = ""


async def _one(client, url: str, model: str, req: BenchRequest, api_key: Optional[str]) -> _Result:
    body = {"model": model, "prompt": req.prompt_token_ids, "max_tokens": req.output_len, "stream": True,
            "temperature": 1.0, "ignore_eos": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    t0 = time.perf_counter()
    last = t0
    res = _Result(ok=False, prompt_tokens=len(req.prompt_token_ids))
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if chunk.get("usage"):
                    res.output_tokens = chunk["usage"].get("completion_tokens", res.output_tokens)
                if not chunk.get("choices"):
                    continue
                now = time.perf_counter()
                if res.ttft == 0.0:
                    res.ttft = now - t0
                else:
                    res.itls.append(now - last)
                last = now
        res.latency = time.perf_counter() - t0
        res.ok = True
    except Exception as e:  # network errors count as failed requests, not crashes
        res.error = repr(e)
    return res


async def _run(base_url: str, model: str, reqs: list[BenchRequest], request_rate: float, burstiness: float,
               max_concurrency: Optional[int], api_key: Optional[str], seed: int):
    import httpx

    rng = np.random.default_rng(seed)
    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    url = base_url.rstrip("/") + "/v1/completions"
    limits = httpx.Limits(max_connections=max_concurrency or 1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        async def guarded(r):
            if sem is None:
                return await _one(client, url, model, r, api_key)
            async with sem:
                return await _one(client, url, model, r, api_key)

        tasks = []
        t0 = time.perf_counter()
        for r in reqs:
            tasks.append(asyncio.create_task(guarded(r)))
            if request_rate != float("inf"):
                # Gamma inter-arrivals with mean 1/rate; burstiness 1 = Poisson.
                await asyncio.sleep(rng.gamma(burstiness, 1.0 / (request_rate * burstiness)))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - t0


def _stats(xs, scale=1000.0) -> dict:
    if not xs:
        return dict(mean=float("nan"), median=float("nan"), p99=float("nan"))
    a = np.asarray(xs) * scale
    return dict(mean=float(a.mean()), median=float(np.median(a)), p99=float(np.percentile(a, 99)))


def run_serve_bench(base_url: str, model: str, reqs: list[BenchRequest], *, request_rate: float = float("inf"),
                    burstiness: float = 1.0, max_concurrency: Optional[int] = None,
                    api_key: Optional[str] = None, seed: int = 0) -> dict:
    results, dur = asyncio.run(_run(base_url, model, reqs, request_rate, burstiness, max_concurrency,
                                    api_key, seed))
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens or (len(r.itls) + 1) for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    itls = [x for r in ok for x in r.itls]
    return dict(kind="serve", num_prompts=len(reqs), completed=len(ok), failed=len(results) - len(ok),
                first_error=next((r.error for r in results if not r.ok), ""), duration_s=dur,
                request_rate=request_rate, max_concurrency=max_concurrency,
                requests_per_s=len(ok) / dur, output_tokens_per_s=out_tokens / dur,
                total_tokens_per_s=(out_tokens + sum(r.prompt_tokens for r in ok)) / dur,
                **{f"ttft_ms_{k}": v for k, v in _stats([r.ttft for r in ok]).items()},
                **{f"tpot_ms_{k}": v for k, v in _stats(tpots).items()},
                **{f"itl_ms_{k}": v for k, v in _stats(itls).items()})
