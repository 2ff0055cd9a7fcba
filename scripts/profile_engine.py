"""Where one engine step's time goes on the GPU: steady-state decode at batch 1 and 256 and a full
prefill step, on Llama-3-8B-shaped dummy weights. For each scenario: wall ms per engine step
(untraced), then the same steps under the JAX profiler with GPU time per kernel category and the
top kernels. One JSON line per scenario.

    XLA_FLAGS=--xla_gpu_enable_command_buffer= python3 scripts/profile_engine.py

Kernels launched inside XLA command buffers (CUDA graphs) are not seen one by one by the
profiler, so profile with command buffers off (the flag above); the untraced wall times of a run
with them on are the comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--steps", type=int, default=8, help="num_scheduler_steps")
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--trace-dir", default="/tmp/jaxserve-trace")
    ap.add_argument("--no-trace", action="store_true")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--decode", nargs="+", default=["1x128", "256x256"], help="decode scenarios BATCHxCONTEXT")
    ap.add_argument("--prefill-len", type=int, default=128, help="prompt length of the full prefill step's prompts")
    ap.add_argument("--decode-steps", type=int, default=6, help="engine steps timed per decode scenario")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--no-warmup", action="store_true", help="compile only the buckets the scenarios use")
    ap.add_argument("--top", type=int, default=12, help="kernels listed per scenario")
    ap.add_argument("--kv-cache-dtype", default="auto", help="auto (the model dtype) or fp8")
    a = ap.parse_args()

    from jaxserve import LLM, SamplingParams
    from jaxserve.bench.profile import profile

    llm = LLM(model=a.model, load_format="dummy", max_model_len=a.max_model_len, max_num_seqs=a.max_num_seqs,
              max_num_batched_tokens=a.max_num_batched_tokens, num_scheduler_steps=a.steps, warmup=not a.no_warmup,
              kv_cache_dtype=a.kv_cache_dtype)
    eng = llm.llm_engine
    vocab = eng.model.arch.vocab_size
    rng = np.random.default_rng(0)
    flags = os.environ.get("XLA_FLAGS", "")
    n = 0

    def add(batch, input_len, max_tokens):
        nonlocal n
        for _ in range(batch):
            n += 1
            eng.add_request(f"p{n}", rng.integers(min(1000, vocab // 2), vocab, input_len).tolist(),
                            SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True), stream=False)

    def drain():
        for rid in list(eng._requests):
            eng.abort_request(rid)
        while eng.has_unfinished_requests():
            eng.step()

    # Host time per phase of an engine step (wall clock of each call, summed).
    import collections
    import functools

    import jaxserve.runner.model_runner as mr

    phase = collections.Counter()

    def timed(name, fn, materialize=False):
        @functools.wraps(fn)
        def w(*args, **kw):
            t0 = time.perf_counter()
            r = fn(*args, **kw)
            if materialize:
                r = list(r)
            phase[name] += time.perf_counter() - t0
            return r
        return w

    eng.scheduler.schedule = timed("schedule", eng.scheduler.schedule)
    eng.scheduler.schedule_next_block = timed("schedule_next_block", eng.scheduler.schedule_next_block)
    eng.scheduler.update_from_output = timed("update_from_output", eng.scheduler.update_from_output, True)
    eng.runner.dispatch = timed("runner.dispatch", eng.runner.dispatch)
    eng.runner.collect = timed("runner.collect (waits for the device)", eng.runner.collect)
    eng.runner._forward = timed("dispatch/forward (puts + step call)", eng.runner._forward)
    for fn in ("prepare_inputs", "advance_decode", "fetch", "sample_tokens", "pack_sampling", "feed_rows"):
        setattr(mr, fn, timed(f"dispatch/{fn}", getattr(mr, fn)))
    eng.step = timed("engine.step (all)", eng.step)

    def report(name, steps_fn, num_steps):
        phase.clear()
        t0 = time.perf_counter()
        for _ in range(num_steps):
            steps_fn()
        wall = (time.perf_counter() - t0) / num_steps
        res = dict(kind="profile_step", scenario=name, xla_flags=flags, kv_cache_dtype=a.kv_cache_dtype,
                   wall_ms_per_step=wall * 1e3,
                   num_scheduler_steps=a.steps,
                   host_ms_per_step={k: round(v * 1e3 / num_steps, 3) for k, v in phase.most_common()})
        if not a.no_trace:
            def run():
                for _ in range(num_steps):
                    steps_fn()
            _, summ = profile(run, f"{a.trace_dir}/{name}", top=a.top)
            summ["kernel_ms_per_step"] = summ.pop("kernel_s") * 1e3 / num_steps
            summ.pop("gpu_lines", None)
            res.update(summ)
        print(json.dumps(res), flush=True)

    # The sampler alone on a 256-row batch: with logprob work (sample) vs tokens only.
    import jax
    import jax.numpy as jnp

    from jaxserve.runner.sampler import sample, sample_tokens
    from jaxserve.runner.sampling_inputs import pack_sampling

    sb = pack_sampling([None] * 256, 256, 2048)
    st = [jnp.asarray(a) for a in sb.packed()]
    lgs = [jax.random.normal(jax.random.PRNGKey(i), (256, vocab), jnp.float32) for i in range(2)]
    fns = dict(sample=lambda x: sample(x, *st, penalties=False, num_logprobs=eng.runner.max_logprobs),
               sample_tokens=lambda x: sample_tokens(x, *st, penalties=False, mode="greedy"))
    times = {}
    for name, f in fns.items():
        jax.block_until_ready(f(lgs[0]))
        t0 = time.perf_counter()
        for i in range(20):
            jax.block_until_ready(f(lgs[i % 2]))
        times[name + "_ms"] = (time.perf_counter() - t0) / 20 * 1e3
    print(json.dumps(dict(kind="sampler", rows=256, vocab=vocab, xla_flags=flags, **times)), flush=True)

    # Decode, steady state: the batch is fully prefilled before timing.
    for batch, ctx in [tuple(map(int, x.split('x'))) for x in a.decode]:
        add(batch, ctx, a.max_model_len - ctx - 1)
        # Every prompt prefilled (prefill chunks of max_num_batched_tokens), then a few decodes.
        for _ in range(-(-batch * ctx // a.max_num_batched_tokens) + 3):
            eng.step()
        report(f"decode_b{batch}_ctx{ctx}", eng.step, a.decode_steps)
        drain()
    # A full prefill step: max_num_batched_tokens / prefill_len prompts, one engine step each.
    def prefill_step():
        add(a.max_num_batched_tokens // a.prefill_len, a.prefill_len, 1)
        while eng.has_unfinished_requests():
            eng.step()
    if a.skip_prefill:
        return
    prefill_step()
    report(f"prefill_{a.max_num_batched_tokens}_len{a.prefill_len}", prefill_step, 3)


if __name__ == "__main__":
    main()
