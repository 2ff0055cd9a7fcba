"""The host's cost of handing one jitted program to the device, by argument count and kernel count:
what part of an engine step's ~2.5 ms of host dispatch (docs/benchmarks.md, fifteenth session) is
per argument (the model's ~230 bf16 / ~360 4-bit arrays and the KV cache) and what part per kernel
(a step's ~500). Each case is timed asynchronously (the host's time to issue `--iters` calls, the
device catching up afterwards), on the device's default options and with `--xla-options`.

    python3 scripts/bench_dispatch.py [--args 1 64 256 512] [--kernels 1 128 512] [--iters 200]

Rows: {"args": n, "kernels": k, "host_us_per_call": ..., "device_us_per_call": ...}.
"""
from __future__ import annotations

import argparse
import json
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--args", type=int, nargs="+", default=[1, 64, 256, 512])
    ap.add_argument("--kernels", type=int, nargs="+", default=[1, 128, 512])
    ap.add_argument("--iters", type=int, default=200)
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp

    def program(n_kernels):
        def f(state, *xs):  # state is donated and fed back, as the engine's KV cache is
            acc = state
            for i in range(n_kernels):  # a chain of small kernels XLA cannot fuse (each a reduction)
                acc = acc + jnp.sum(jnp.sin(acc)) * 1e-9 + xs[i % len(xs)][0] * 0
            return acc
        return jax.jit(f, donate_argnums=(0,))

    for n in a.args:
        xs = [jnp.full((16,), i, jnp.float32) for i in range(n)]
        for k in a.kernels:
            f = program(k)
            state = jnp.zeros((1024,), jnp.float32)
            for _ in range(3):
                state = f(state, *xs)
            jax.block_until_ready(state)
            t0 = time.perf_counter()
            for _ in range(a.iters):
                state = f(state, *xs)
            host = (time.perf_counter() - t0) / a.iters
            jax.block_until_ready(state)
            total = (time.perf_counter() - t0) / a.iters
            print(json.dumps(dict(args=n, kernels=k, host_us_per_call=round(host * 1e6, 1),
                                  device_us_per_call=round(total * 1e6, 1), backend=jax.default_backend())),
                  flush=True)


if __name__ == "__main__":
    main()
