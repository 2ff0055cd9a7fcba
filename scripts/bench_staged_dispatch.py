"""Host time of dispatching a staged prefill / mixed step: what the engine does after the step
before it has finished (its tokens written in) and before the device can start this one, i.e.
what the device waits on between prefill steps under async scheduling. Times runner.dispatch
for staged steps during offline runs on the default model (CPU is fine: the work is host work).
Run it in two trees for a same-machine A/B:

    python3 scripts/bench_staged_dispatch.py [--max-num-seqs 256] [--runs 2]
    (cd OTHER_TREE && PYTHONPATH=$PWD python3 /path/to/this/script)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=2048)
    ap.add_argument("--num-prompts", type=int, default=512)
    ap.add_argument("--input-len", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=8)
    ap.add_argument("--runs", type=int, default=2)
    a = ap.parse_args()

    from jaxserve import LLM
    from jaxserve.bench.offline import run_throughput

    llm = LLM(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens, max_model_len=512,
              num_gpu_blocks_override=3000)
    runner = llm.llm_engine.runner
    real, times = runner.dispatch, []

    def timed(so, prev=None, **kw):
        t0 = time.perf_counter()
        p = real(so, prev, **kw)
        if kw.get("staged") is not None or kw.get("inp") is not None:  # (inp=: trees before StagedStep)
            times.append(time.perf_counter() - t0)
        return p

    runner.dispatch = timed
    for _ in range(a.runs):
        times.clear()
        run_throughput({}, dataset="random", num_prompts=a.num_prompts, input_len=a.input_len,
                       output_len=a.output_len, llm=llm)
        print(json.dumps(dict(kind="staged_dispatch", steps=len(times), max_num_seqs=a.max_num_seqs,
                              median_ms=statistics.median(times) * 1e3 if times else None,
                              mean_ms=statistics.mean(times) * 1e3 if times else None)), flush=True)


if __name__ == "__main__":
    main()
