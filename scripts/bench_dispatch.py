"""The host's cost of handing one jitted program to the device, by argument count and kernel count:
what part of an engine step's ~2.5 ms of host dispatch (docs/benchmarks.md, fifteenth session) is
per argument (the model's ~230 bf16 / ~360 4-bit arrays and the KV cache) and what part per kernel
(a step's ~500). Each case is timed asynchronously (the host's time to issue `--iters` calls, the
device catching up afterwards), on the device's default options and with `--xla-options`.

    python3 scripts/bench_dispatch.py [--args 1 64 256 512] [--kernels 1 128 512] [--iters 200]
    python3 scripts/bench_dispatch.py --transfers

Rows: {"args": n, "kernels": k, "host_us_per_call": ..., "device_us_per_call": ...}. Past the
runtime's limit on executions in flight (~28 on the H200, jax 0.11.2) the host waits for the device,
so host_us_per_call only measures the host where it is well under device_us_per_call's pace or the
rows are host-bound (host == device).

--transfers instead: a step's small host inputs (4 int32 arrays, as the runner sends) handed to a
jitted call through jax.device_put (batched, or one by one), as numpy straight into the call (its C++
dispatch transfers them), and concatenated into one array; rows {"case": ..., "us_per_call": ...}.
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
    ap.add_argument("--transfers", action="store_true", help="time ways of handing host arrays to a call")
    a = ap.parse_args()

    import jax
    import jax.numpy as jnp

    if a.transfers:
        return transfers(a.iters * 10)

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


def transfers(iters: int) -> None:
    import jax
    import numpy as np

    f4 = jax.jit(lambda *xs: sum(x.sum() for x in xs))  # the call takes 4 arrays
    f1 = jax.jit(lambda x: x.sum())
    host = [np.arange(n, dtype=np.int32) for n in (16, 200, 64, 8)]  # token ids, metadata, sampling, counters
    flat = np.concatenate(host)
    on_device = [jax.device_put(x) for x in host]
    cases = {
        "device_put batched, 4 arrays": lambda: f4(*jax.device_put(tuple(host))),
        "device_put one by one, 4 arrays": lambda: f4(*[jax.device_put(x) for x in host]),
        "numpy into the call, 4 arrays": lambda: f4(*host),
        "device_put, 1 array": lambda: f1(jax.device_put(flat)),
        "numpy into the call, 1 array": lambda: f1(flat),
        "already on the device, 4 arrays": lambda: f4(*on_device),
    }
    for name, fn in cases.items():
        for _ in range(50):
            fn()
        jax.block_until_ready(fn())
        t0 = time.perf_counter()
        for _ in range(iters):
            out = fn()
        jax.block_until_ready(out)
        print(json.dumps(dict(case=name, us_per_call=round((time.perf_counter() - t0) / iters * 1e6, 1),
                              backend=jax.default_backend())), flush=True)


if __name__ == "__main__":
    main()
