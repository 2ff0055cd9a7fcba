"""Online benchmark against a running OpenAI-compatible server (like `vllm bench serve`):
Poisson (gamma, with burstiness) arrivals, optional max concurrency, streamed completions;
reports request and token throughput; mean, median and the asked percentiles (default p99) of
TTFT, TPOT, inter-token latency and end-to-end latency (vLLM's --percentile-metrics and
--metric-percentiles); and goodput, the completed requests per second that met every SLO given
(vLLM's --goodput ttft:MS tpot:MS e2el:MS).
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


METRICS = ("ttft", "tpot", "itl", "e2el")  # what --percentile-metrics and --goodput may name
GOODPUT_METRICS = ("ttft", "tpot", "e2el")  # per-request values (itl has one per token)


def _stats(xs, percentiles, scale=1000.0) -> dict:
    """Mean, median and each percentile of xs (seconds) in milliseconds; "p99.9" for 99.9."""
    a = np.asarray(xs, dtype=float) * scale
    out = dict(mean=float(a.mean()) if a.size else float("nan"),
               median=float(np.median(a)) if a.size else float("nan"))
    for q in percentiles:
        out[f"p{q:g}"] = float(np.percentile(a, q)) if a.size else float("nan")
    return out


def _tpot(r: _Result) -> Optional[float]:
    """Time per output token after the first (None for one-token outputs)."""
    return (r.latency - r.ttft) / (r.output_tokens - 1) if r.output_tokens > 1 else None


def parse_goodput(items: list[str]) -> dict[str, float]:
    """["ttft:200", "tpot:50"] -> {"ttft": 0.2, "tpot": 0.05} (seconds), as vLLM's --goodput."""
    slos = {}
    for item in items:
        name, sep, value = item.partition(":")
        if not sep or name not in GOODPUT_METRICS:
            raise ValueError(f"--goodput takes NAME:MILLISECONDS with NAME one of {', '.join(GOODPUT_METRICS)}; "
                             f"got {item!r}")
        try:
            ms = float(value)
        except ValueError:
            raise ValueError(f"--goodput {item!r}: {value!r} is not a number of milliseconds") from None
        if ms < 0:
            raise ValueError(f"--goodput {item!r}: the SLO must be >= 0 ms")
        slos[name] = ms / 1000.0
    return slos


def meets_slos(r: _Result, slos: dict[str, float]) -> bool:
    """Whether a completed request stayed within every SLO (a one-token output has no TPOT)."""
    values = {"ttft": r.ttft, "e2el": r.latency, "tpot": _tpot(r)}
    return all(values[k] is None or values[k] <= v for k, v in slos.items())


def parse_percentile_args(metrics: str, percentiles: str) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """vLLM's "ttft,tpot,itl" and "50,90,99" -> validated tuples."""
    names = tuple(m.strip() for m in metrics.split(",") if m.strip())
    bad = [m for m in names if m not in METRICS]
    if bad or not names:
        raise ValueError(f"--percentile-metrics takes a comma-separated subset of {','.join(METRICS)}; got {metrics!r}")
    try:
        qs = tuple(float(q) for q in percentiles.split(",") if q.strip())
    except ValueError:
        raise ValueError(f"--metric-percentiles takes numbers like 50,90,99; got {percentiles!r}") from None
    if not qs or any(not 0 < q <= 100 for q in qs):
        raise ValueError(f"--metric-percentiles: each percentile must be in (0, 100]; got {percentiles!r}")
    return names, qs


def run_serve_bench(base_url: str, model: str, reqs: list[BenchRequest], *, request_rate: float = float("inf"),
                    burstiness: float = 1.0, max_concurrency: Optional[int] = None,
                    api_key: Optional[str] = None, seed: int = 0,
                    percentile_metrics: tuple[str, ...] = ("ttft", "tpot", "itl"),
                    metric_percentiles: tuple[float, ...] = (99,),
                    goodput: Optional[dict[str, float]] = None) -> dict:
    results, dur = asyncio.run(_run(base_url, model, reqs, request_rate, burstiness, max_concurrency,
                                    api_key, seed))
    return summarize(results, dur, request_rate=request_rate, max_concurrency=max_concurrency,
                     percentile_metrics=percentile_metrics, metric_percentiles=metric_percentiles,
                     goodput=goodput)


def summarize(results: list[_Result], dur: float, *, request_rate: float, max_concurrency: Optional[int],
              percentile_metrics: tuple[str, ...], metric_percentiles: tuple[float, ...],
              goodput: Optional[dict[str, float]]) -> dict:
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens or (len(r.itls) + 1) for r in ok)
    series = {"ttft": [r.ttft for r in ok], "tpot": [t for t in map(_tpot, ok) if t is not None],
              "itl": [x for r in ok for x in r.itls], "e2el": [r.latency for r in ok]}
    res = dict(kind="serve", num_prompts=len(results), completed=len(ok), failed=len(results) - len(ok),
               first_error=next((r.error for r in results if not r.ok), ""), duration_s=dur,
               request_rate=request_rate, max_concurrency=max_concurrency,
               requests_per_s=len(ok) / dur, output_tokens_per_s=out_tokens / dur,
               total_tokens_per_s=(out_tokens + sum(r.prompt_tokens for r in ok)) / dur)
    if goodput:
        good = sum(meets_slos(r, goodput) for r in ok)
        res.update(goodput_slos_ms={k: v * 1000.0 for k, v in goodput.items()}, good_requests=good,
                   request_goodput=good / dur)
    for m in percentile_metrics:
        res.update({f"{m}_ms_{k}": v for k, v in _stats(series[m], metric_percentiles).items()})
    return res
