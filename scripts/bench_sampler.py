"""Time the tokens-only sampler (runner/sampler.py sample_tokens) on a decode step's logits:
rows x a Llama-3 vocabulary of float32 logits, per mode, pipelined (calls dispatched back to
back, one wait at the end), as the engine runs it after each step. Run it in two trees for a
same-call A/B. One JSON line per (rows, mode). "filtered" rows ask for temperature 0.8, top_k 50,
top_p 0.95 (what a served request with top_p costs: every row's logits sorted), and its line adds
the variant with 5 logprobs and each program's temporaries (XLA's memory analysis).

    python3 scripts/bench_sampler.py --rows 256 1024 --modes greedy random filtered
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
    from jaxserve.runner.sampler import sample, sample_tokens
    from jaxserve.runner.sampling_inputs import pack_sampling

    for rows in a.rows:
        logits = jax.random.normal(jax.random.PRNGKey(0), (rows, a.vocab), jax.numpy.float32) * 3
        for mode in a.modes:
            filtered = mode == "filtered"
            st = SamplingState(temperature=0.0 if mode == "greedy" else 0.8 if filtered else 1.0,
                               top_k=50 if filtered else 0, top_p=0.95 if filtered else 1.0, min_p=0.0,
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
            line = dict(kind="sampler", rows=rows, vocab=a.vocab, mode=sb.mode, ms=ms,
                        logits_gb_per_s=rows * a.vocab * 4 / ms / 1e6, tokens_head=np.asarray(out[:4]).tolist(),
                        temp_gib=sample_tokens.lower(logits, packed, counters, penalties=False, mode=sb.mode)
                        .compile().memory_analysis().temp_size_in_bytes / 2 ** 30)
            if filtered:
                g = lambda: sample(logits, packed, counters, penalties=False, num_logprobs=5, mode=sb.mode)  # noqa: E731
                jax.block_until_ready(g())
                t0 = time.perf_counter()
                for _ in range(a.iters):
                    out = g()
                jax.block_until_ready(out)
                line["with_logprobs_ms"] = (time.perf_counter() - t0) / a.iters * 1e3
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
