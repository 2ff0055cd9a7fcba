"""One engine, several workloads, A/B in the same process: Llama-3-8B-shaped dummy weights, and
each workload run with single-step and with multi-step decoding (num_scheduler_steps), with and
without async scheduling, the scheduler settings switched between runs on the same compiled
engine. One JSON line per result.

    python3 scripts/bench_engine_suite.py --steps 1 8 [--async-scheduling on off] [--mesh]
        [--workloads b1 128x128 1024x128 1000x1000 (b8 b32 4096x128)] [--timeline]
        [--admission-headroom-tokens 0 256] [--num-gpu-blocks-override N] [--sampling filtered]

--mesh builds the engine through the device-mesh path (ParallelPlan with tp=1, pp=1) instead of
the single-device path, to measure what the mesh costs on one GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

WORKLOADS = {  # name -> (kind, input_len, output_len, num_prompts or batch)
    "b1": ("latency", 32, 128, 1),
    "b8": ("latency", 32, 128, 8),  # small batches: the 16- and 32-row buckets (4-bit weights' kernel)
    "b32": ("latency", 32, 128, 32),
    "128x128": ("throughput", 128, 128, 1024),
    "1024x128": ("throughput", 1024, 128, 512),
    "1000x1000": ("throughput", 1000, 1000, 256),
    "4096x128": ("throughput", 4096, 128, 128),  # long prompts (not in the issue-6 table)
    "smoke": ("throughput", 64, 32, 32),
}
SAMPLING = {"random": None, "filtered": dict(temperature=0.8, top_k=50, top_p=0.95)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", help="a named config for dummy weights; 'default': the "
                    "embedded default model's weights (CPU smoke runs)")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--async-scheduling", nargs="+", choices=("on", "off"), default=["on"])
    ap.add_argument("--workloads", nargs="+", default=[w for w in WORKLOADS if w not in ("4096x128", "b8", "b32")])
    ap.add_argument("--max-num-seqs", type=int, default=None,
                    help="default: the engine's offline default (256 on accelerators)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's (8192 offline)")
    ap.add_argument("--max-model-len", type=int, default=None,
                    help="default: 2048, or the longest selected workload's prompt + output if longer")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or fp8")
    ap.add_argument("--quantization", default=None, choices=("fp8", "awq", "gptq"),
                    help="float8 weights (models/quant.py) or random 4-bit ones (models/int4.py)")
    ap.add_argument("--admission-headroom-tokens", type=int, nargs="+", default=[None],
                    help="scheduler admission headroom(s) to run each workload with, switched on the same "
                    "engine (default: the engine's)")
    ap.add_argument("--num-gpu-blocks-override", type=int, default=None,
                    help="KV cache blocks (of 16 tokens), e.g. 26300 for an H100's ~421k tokens of Llama-3-8B")
    ap.add_argument("--preemption-mode", choices=("recompute", "swap"), default=None,
                    help="what a sequence the cache cannot hold loses (default: the engine's, recompute)")
    ap.add_argument("--swap-space", type=float, default=None, help="GiB of host memory for swap preemption")
    ap.add_argument("--mesh", action="store_true")
    ap.add_argument("--sampling", choices=tuple(SAMPLING), default="random",
                    help="filtered: every request with temperature 0.8, top_k 50, top_p 0.95; else the "
                    "throughput workloads sample at temperature 1, the latency one greedily")
    ap.add_argument("--timeline", action="store_true", help="also run each throughput workload once more "
                    "(largest K) with the engine's step trace on and print where the wall time went: prefill "
                    "steps, decode steps by batch fill, preemptions")
    ap.add_argument("--profile", metavar="DIR", help="also run each workload once more (largest K) under the "
                    "JAX profiler and print where the GPU time went")
    a = ap.parse_args()

    import jax

    from jaxserve import LLM
    from jaxserve.bench.offline import run_latency, run_throughput
    from jaxserve.config import engine_config_from_kwargs
    from jaxserve.engine.llm_engine import LLMEngine
    from jaxserve.models.int4 import layout as int4_layout

    if a.max_model_len is None:
        a.max_model_len = max([2048] + [WORKLOADS[w][1] + WORKLOADS[w][2] for w in a.workloads if w in WORKLOADS])
    default = a.model == "default"
    kw = dict(model=None if default else a.model, load_format="auto" if default else "dummy",
              max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens, num_scheduler_steps=max(a.steps),
              kv_cache_dtype=a.kv_cache_dtype, async_scheduling="on" in a.async_scheduling,
              quantization=a.quantization, num_gpu_blocks_override=a.num_gpu_blocks_override,
              preemption_mode=a.preemption_mode, swap_space=a.swap_space)
    kw = {k: v for k, v in kw.items() if v is not None}  # unset: the engine's defaults
    t0 = time.perf_counter()
    if a.mesh:  # the same LLM front end over an engine placed through ParallelPlan on one device
        llm = LLM.__new__(LLM)
        import itertools

        llm._counter = itertools.count()
        from jaxserve.usage_defaults import OFFLINE, apply_usage_defaults

        kw = apply_usage_defaults(kw, OFFLINE)
        llm.llm_engine = LLMEngine(engine_config_from_kwargs(**kw), devices=jax.devices()[:1])
    else:
        llm = LLM(**kw)
    startup = time.perf_counter() - t0
    eng = llm.llm_engine
    print(json.dumps(dict(kind="startup", startup_s=startup, mesh=a.mesh, model=a.model, quantization=a.quantization,
                          kv_cache_tokens=eng.runner.num_blocks * eng.scheduler.block_size,
                          compilations=eng.runner.num_compilations(), max_num_seqs=eng.scheduler.cfg.max_num_seqs,
                          max_num_batched_tokens=eng.scheduler.cfg.max_num_batched_tokens,
                          int4_layout=int4_layout(eng.model.params), xla_flags=os.environ.get("XLA_FLAGS", ""))),
          flush=True)
    base_cfg = eng.scheduler.cfg
    for name in a.workloads:
        kind, il, ol, n = WORKLOADS[name]
        for k, asyn, hr in [(k, x, h) for k in a.steps for x in a.async_scheduling for h in a.admission_headroom_tokens]:
            eng.scheduler.cfg = dataclasses.replace(base_cfg, num_scheduler_steps=k, async_scheduling=asyn == "on",
                                                    **({} if hr is None else dict(admission_headroom_tokens=hr)))
            c0 = eng.runner.num_compilations()
            if kind == "latency":
                res = run_latency({}, batch_size=n, input_len=il, output_len=ol, num_iters=3, llm=llm,
                                  sampling=SAMPLING[a.sampling])
            else:
                res = run_throughput({}, dataset="random", num_prompts=n, input_len=il, output_len=ol, llm=llm,
                                     sampling=SAMPLING[a.sampling])
            res.update(workload=name, sampling=a.sampling, num_scheduler_steps=k, async_scheduling=asyn, mesh=a.mesh,
                       kv_cache_dtype=a.kv_cache_dtype,
                       admission_headroom_tokens=eng.scheduler.cfg.admission_headroom_tokens,
                       quantization=a.quantization, new_compilations=eng.runner.num_compilations() - c0)
            print(json.dumps(res), flush=True)
        if a.timeline and kind == "throughput":
            from jaxserve.engine.trace import summarize_trace

            eng.trace, t0 = [], time.time()
            try:
                res = run_throughput({}, dataset="random", num_prompts=n, input_len=il, output_len=ol, llm=llm)
            finally:
                trace, eng.trace = eng.trace, None
            print(json.dumps(dict(kind="timeline", workload=name, num_scheduler_steps=eng.scheduler.cfg.num_scheduler_steps,
                                  output_tokens_per_s=res["output_tokens_per_s"],
                                  **summarize_trace(trace, start_time=t0, max_num_seqs=base_cfg.max_num_seqs))), flush=True)
        if a.profile:
            from jaxserve.bench.profile import profile

            def again():
                if kind == "latency":
                    return run_latency({}, batch_size=n, input_len=il, output_len=ol, num_iters=1, llm=llm)
                return run_throughput({}, dataset="random", num_prompts=n, input_len=il, output_len=ol, llm=llm)
            _, summ = profile(again, f"{a.profile}/{name}")
            print(json.dumps(dict(kind="profile", workload=name, num_scheduler_steps=max(a.steps), **summ)),
                  flush=True)


if __name__ == "__main__":
    main()
