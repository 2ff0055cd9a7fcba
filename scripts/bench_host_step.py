"""Where the host's time goes in each engine step of a real run, on the real device: the engine's
step() split into runner.dispatch (and inside it the host's arrays, the transfers (_put), the
stage's jitted call (_forward) and the sampler's), the wait inside runner.collect (device time the host spends
blocked), scheduler.update_from_output, scheduler.schedule_next_block / schedule_next_step, and
the rest (outputs, detokenizing). If the host's busy time per step (everything but the wait)
exceeds the device's step time, the device idles between steps: that is what async scheduling
at K=1 must avoid. Prints one JSON line per (workload, K).

    python3 scripts/bench_host_step.py [--model llama-3-8b] [--steps 1 16] [--batch 1] [--output-len 128]
        [--max-num-batched-tokens N] [--quantization awq] [--trace DIR]
"""
from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", help="a named config for dummy weights; 'default': the embedded model")
    ap.add_argument("--steps", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--quantization", default=None, help="fp8 | awq | gptq: the dummy weights in that form")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None,
                    help="default: the engine's (fewer token buckets to warm up when smaller)")
    ap.add_argument("--trace", default=None, metavar="DIR",
                    help="also trace one run per workload and print the host's events per engine step")
    a = ap.parse_args()

    import dataclasses

    import numpy as np

    from jaxserve import LLM, SamplingParams

    default = a.model == "default"
    llm = LLM(model=None if default else a.model, load_format="auto" if default else "dummy",
              max_model_len=2048, num_scheduler_steps=max(a.steps), quantization=a.quantization,
              **({"max_num_batched_tokens": a.max_num_batched_tokens} if a.max_num_batched_tokens else {}))
    eng = llm.llm_engine
    runner, sched = eng.runner, eng.scheduler
    from jaxserve.bench.timers import Timers

    tm = Timers()
    # collect() = the wait for the device plus building the output; the wait is np.asarray on the
    # fetched tokens, timed by wrapping runner.collect whole and subtracting nothing: collect's own
    # host work is a few array slices.
    for name in ("dispatch", "collect", "_forward", "_put"):
        tm.wrap(runner, name)
    # inside dispatch: the host's arrays, then the jitted calls (the stage's jit is inside _forward)
    from jaxserve.runner import model_runner as mr
    for name in ("prepare_inputs", "pack_sampling", "sample_tokens", "feed_rows"):
        tm.wrap(mr, name)
    for name in ("update_from_output", "schedule_next_block", "schedule_next_step", "schedule"):
        tm.wrap(sched, name)
    tm.wrap(eng, "step")
    base = sched.cfg
    rng = np.random.default_rng(0)
    V = eng.model.arch.vocab_size
    for b in a.batch:
        for k in a.steps:
            sched.cfg = dataclasses.replace(base, num_scheduler_steps=k)
            prompts = [{"prompt_token_ids": rng.integers(0, V, a.input_len).tolist()} for _ in range(b)]
            sp = SamplingParams(max_tokens=a.output_len, ignore_eos=True, temperature=1.0)
            llm.generate(prompts, sp, use_tqdm=False)  # warm
            tm.reset()
            t0 = time.perf_counter()
            for _ in range(a.iters):
                llm.reset_prefix_cache()
                llm.generate(prompts, sp, use_tqdm=False)
            wall = time.perf_counter() - t0
            steps = tm.n["step"]
            per = {key: round(1e3 * v / max(1, steps), 4) for key, v in tm.s.items()}
            host_busy = tm.s["step"] - tm.s["collect"]
            print(json.dumps(dict(kind="host_step", batch=b, num_scheduler_steps=k, output_len=a.output_len,
                                  wall_s=wall, engine_steps=steps, tokens_per_s=b * a.output_len * a.iters / wall,
                                  ms_per_engine_step=per, host_busy_ms_per_step=1e3 * host_busy / max(1, steps),
                                  wall_ms_per_step=1e3 * wall / max(1, steps))), flush=True)
            if a.trace:  # the same run once more under the profiler: the host's events per step
                import jax

                from jaxserve.bench.profile import host_summary
                d = f"{a.trace}/b{b}_k{k}"
                tm.reset()
                llm.reset_prefix_cache()
                with jax.profiler.trace(d):
                    llm.generate(prompts, sp, use_tqdm=False)
                print(json.dumps(dict(kind="host_trace", batch=b, num_scheduler_steps=k, trace_dir=d,
                                      **host_summary(d, per=max(1, tm.n["step"])))), flush=True)


if __name__ == "__main__":
    main()
