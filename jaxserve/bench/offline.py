"""Offline benchmarks on the LLM API: throughput (many requests) and latency (batch-N decode)."""
from __future__ import annotations

import gc
import json
import os
import time
from typing import Optional

import numpy as np

from jaxserve.bench.datasets import check_dataset, make_requests
from jaxserve.sampling_params import SamplingParams


def _build_llm(engine_kwargs: dict):
    from jaxserve.llm import LLM

    t0 = time.perf_counter()
    llm = LLM(**engine_kwargs)
    return llm, time.perf_counter() - t0


def run_throughput(engine_kwargs: dict, *, dataset: str, num_prompts: int, input_len: int, output_len: int,
                   seed: int = 0, range_ratio: float = 0.0, llm=None, dataset_path: Optional[str] = None,
                   fixed_output_len: Optional[int] = None, sampling: Optional[dict] = None) -> dict:
    """llm: an already built LLM (benchmark suites reuse one engine); else built from engine_kwargs.
    dataset_path: a ShareGPT-format file for dataset "sharegpt", tokenized with the engine's tokenizer.
    sampling: SamplingParams fields over the default (temperature 1, no filter), e.g. top_p."""
    check_dataset(dataset, dataset_path)  # before minutes of start-up, not after
    llm, startup_s = (llm, 0.0) if llm is not None else _build_llm(engine_kwargs)
    eng = llm.llm_engine
    reqs = make_requests(dataset, num_prompts, input_len, output_len, eng.model.arch.vocab_size,
                         eng.max_model_len, seed, range_ratio, dataset_path=dataset_path,
                         tokenizer=eng.tokenizer, fixed_output_len=fixed_output_len)
    num_prompts = len(reqs)  # a dataset file may hold fewer that fit
    params = [SamplingParams(**{**dict(temperature=1.0, top_p=1.0), **(sampling or {})}, max_tokens=r.output_len,
                             ignore_eos=True, seed=i) for i, r in enumerate(reqs)]
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in reqs]
    # A reused engine must not serve these prompts from the prefix cache of an earlier run.
    if not llm.reset_prefix_cache():
        raise RuntimeError("the engine still holds requests; cannot reset the prefix cache before timing")
    compiles0 = eng.runner.num_compilations()
    st0 = eng.get_stats()
    hits0, preempt0, async0 = st0.prefix_cache_hits, st0.num_preemptions_total, st0.num_async_steps
    pauses = _GcPauses()
    t0 = time.perf_counter()
    with pauses:
        outs = llm.generate(prompts, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    failed = [o.error for o in outs if o.error]
    if failed:  # a figure over requests that never ran would be meaningless
        raise RuntimeError(f"{len(failed)} of {len(outs)} benchmark requests failed, e.g.: {failed[0]}")
    st = eng.get_stats()
    n_in = sum(len(r.prompt_token_ids) for r in reqs)
    n_out = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(kind="throughput", dataset=dataset, num_prompts=num_prompts, input_len=input_len,
                output_len=output_len, elapsed_s=dt, requests_per_s=num_prompts / dt,
                total_tokens_per_s=(n_in + n_out) / dt, output_tokens_per_s=n_out / dt,
                prompt_tokens=n_in, output_tokens=n_out, startup_s=startup_s,
                compilations_during_run=eng.runner.num_compilations() - compiles0,
                prefix_cache_hit_tokens=st.prefix_cache_hits - hits0,
                preemptions=st.num_preemptions_total - preempt0, num_steps=st.num_steps - st0.num_steps,
                async_steps=st.num_async_steps - async0, gc_full_collections=pauses.count,
                gc_full_collection_ms=round(pauses.seconds * 1e3, 1))


class _GcPauses:
    """Counts the garbage collector's full (generation-2) collections inside a `with` block and
    their total time: each stops the host thread that feeds the device."""

    def __init__(self):
        self.count, self.seconds, self._t = 0, 0.0, None

    def _cb(self, phase, info):
        if info.get("generation") != 2:
            return
        if phase == "start":
            self._t = time.perf_counter()
        elif self._t is not None:
            self.count += 1
            self.seconds += time.perf_counter() - self._t
            self._t = None

    def __enter__(self):
        gc.callbacks.append(self._cb)
        return self

    def __exit__(self, *exc):
        gc.callbacks.remove(self._cb)


LATENCY_PERCENTILES = (10, 25, 50, 75, 90, 99)  # what vLLM's `bench latency` prints


def run_latency(engine_kwargs: dict, *, batch_size: int, input_len: int, output_len: int,
                num_iters: int = 3, num_iters_warmup: int = 1, llm=None, sampling: Optional[dict] = None) -> dict:
    """Batch-N: the batch's end-to-end latency (mean and percentiles over the timed iterations,
    after num_iters_warmup untimed ones), the time to its first streamed token, and decode
    tokens/s per sequence. sampling: SamplingParams fields over the default (greedy).

    The decode rate is (output_len - 1) / (e2e - e2e of the same batch with one output token):
    both runs pay the same prefill, so the difference is the decode steps alone. Timing from the
    first streamed token instead over-counts when a step runs ahead of the host: with
    num_scheduler_steps = K, steps after the first token were on the device before that token
    reached the host, and the older figure read high (docs/benchmarks.md, 2026-12-01, seventh
    session)."""
    if num_iters < 1 or num_iters_warmup < 0:
        raise ValueError(f"--num-iters must be >= 1 and --num-iters-warmup >= 0 (got {num_iters}, {num_iters_warmup})")
    llm, startup_s = (llm, 0.0) if llm is not None else _build_llm(engine_kwargs)
    eng = llm.llm_engine
    vocab = eng.model.arch.vocab_size
    rng = np.random.default_rng(0)

    def batch(tag: str, max_tokens: int) -> tuple[float, Optional[float]]:
        """(end-to-end seconds, seconds to the first streamed token) of one batch; fresh random
        prompts every time, so no run is served from the prefix cache of another."""
        for i in range(batch_size):
            ids = rng.integers(min(1000, vocab // 2), vocab, input_len).tolist()
            sp = SamplingParams(**{"temperature": 0.0, **(sampling or {})}, max_tokens=max_tokens,
                                ignore_eos=True, seed=i)
            eng.add_request(f"lat-{tag}-{i}", ids, sp)
        t0 = time.perf_counter()
        first = None
        while eng.has_unfinished_requests():
            outs = eng.step()
            if first is None and any(o.outputs[0].token_ids for o in outs):
                first = time.perf_counter()
        return time.perf_counter() - t0, None if first is None else first - t0

    ttfts, e2e, prefill = [], [], []
    for it in range(num_iters_warmup + num_iters):  # the warm-up iterations are not timed
        full, ttft = batch(f"{it}", output_len)
        one, _ = batch(f"{it}-1", 1)
        if it < num_iters_warmup:
            continue
        ttfts.append(ttft)
        e2e.append(full)
        prefill.append(one)
    decode_s = float(np.median(e2e)) - float(np.median(prefill))
    rate = (output_len - 1) / decode_s if output_len > 1 and decode_s > 0 else float("nan")
    return dict(kind="latency", batch_size=batch_size, input_len=input_len, output_len=output_len,
                ttft_s=float(np.median(ttfts)), e2e_s=float(np.median(e2e)), prefill_e2e_s=float(np.median(prefill)),
                decode_tokens_per_s_per_seq=rate, decode_tokens_per_s=rate * batch_size, startup_s=startup_s,
                avg_latency_s=float(np.mean(e2e)),
                latency_percentiles_s={f"p{q}": float(np.percentile(e2e, q)) for q in LATENCY_PERCENTILES})


def print_result(res: dict, as_json: bool = False) -> None:
    if as_json:
        print(json.dumps(res))
        return
    for k, v in res.items():
        print(f"{k:>32}: {v:.4g}" if isinstance(v, float) else f"{k:>32}: {v}")


def write_result(res: dict, path: str) -> None:
    """The result as one JSON object in `path` (its folder made when missing)."""
    folder = os.path.dirname(path)
    if folder:
        os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
        f.write("\n")
