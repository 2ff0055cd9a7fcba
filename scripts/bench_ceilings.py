"""Measure the hardware ceilings in the same run as a benchmark, through JAX. One JSON line:
- copy_bytes_per_s: a device-to-device elementwise copy, bytes read + written, host-timed median
  of single calls (the figure every earlier entry of docs/benchmarks.md quotes);
- copy_pipelined_bytes_per_s: the same copy dispatched back to back (no per-call sync);
- read_bytes_per_s: a read-only stream (a float32 sum over 2 GiB of bf16), pipelined: what a
  decode step's weight and K/V reads can reach, since they read and barely write;
- bf16_matmul_flops: an 8192^3 bf16 matmul."""
import json
import time

import jax
import jax.numpy as jnp

from bench_attention import timeit_pipelined  # (scripts/ is on sys.path when a script in it runs)


def _median_time(f, *args, iters=20):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(f(*args))
        ts.append(time.perf_counter() - t0)
    ts.sort()
    return ts[len(ts) // 2]


def main():
    n = 1 << 30  # 2 GiB of bf16
    xs = [jax.random.normal(jax.random.PRNGKey(i), (n,), jnp.bfloat16) for i in range(2)]
    copy = jax.jit(lambda x: x * 1)
    t = min(_median_time(copy, x) for x in xs)
    bw = 2 * n * 2 / t
    # back to back, one wait at the end, alternating inputs (no call reuses the last one's lines)
    bw_pipe = 2 * n * 2 / timeit_pipelined(copy, [(x,) for x in xs])
    # [rows, 4096] summed over the rows: a column-parallel read that XLA tiles across every SM.
    read = jax.jit(lambda x: jnp.sum(x.reshape(-1, 4096), axis=0, dtype=jnp.float32))
    bw_read = n * 2 / timeit_pipelined(read, [(x,) for x in xs])
    del xs
    m = 8192
    a = jax.random.normal(jax.random.PRNGKey(3), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(4), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t2 = _median_time(mm, a, b)
    print(json.dumps(dict(kind="ceilings", device=jax.devices()[0].device_kind, copy_bytes_per_s=bw,
                          copy_pipelined_bytes_per_s=bw_pipe, read_bytes_per_s=bw_read,
                          bf16_matmul_flops=2 * m ** 3 / t2)), flush=True)


if __name__ == "__main__":
    main()
