"""Time the tokens-only sampler (runner/sampler.py sample_tokens) on a decode step's logits:
rows x a Llama-3 vocabulary of float32 logits, per mode, pipelined (calls dispatched back to
back, one wait at the end), as the engine runs it after each step. Run it in two trees for a
same-call A/B. One JSON line per (rows, mode).

    python3 scripts/bench_sampler.py --rows 256 1024 --modes greedy random
"""
from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--modes", nargs="+", default=["greedy", "random"])
    ap.add_argument("--iters", type=int, default=50)
    a = ap.parse_args()

    import jax
    import numpy as np

    from jaxserve.core.sched_output import SamplingState
    from jaxserve.runner.sampler import sample_tokens
    from jaxserve.runner.sampling_inputs import pack_sampling

    for rows in a.rows:
        logits = jax.random.normal(jax.random.PRNGKey(0), (rows, a.vocab), jax.numpy.float32) * 3
        for mode in a.modes:
            st = SamplingState(temperature=0.0 if mode == "greedy" else 1.0, top_k=0, top_p=1.0, min_p=0.0,
                               presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0, seed=1,
                               num_output_tokens=0, logprobs=-1, prompt_logprobs=-1)
            sb = pack_sampling([st] * rows, rows, 8)
            packed, counters = (jax.device_put(x) for x in sb.packed())
            f = lambda: sample_tokens(logits, packed, counters, penalties=False, mode=sb.mode)  # noqa: E731
            jax.block_until_ready(f())
            t0 = time.perf_counter()
            for _ in range(a.iters):
                out = f()
            jax.block_until_ready(out)
            ms = (time.perf_counter() - t0) / a.iters * 1e3
            print(json.dumps(dict(kind="sampler", rows=rows, vocab=a.vocab, mode=sb.mode, ms=ms,
                                  logits_gb_per_s=rows * a.vocab * 4 / ms / 1e6,
                                  tokens_head=np.asarray(out[:4]).tolist())), flush=True)


if __name__ == "__main__":
    main()
