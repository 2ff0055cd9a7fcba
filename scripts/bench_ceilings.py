"""Measure the two hardware ceilings in the same run as a benchmark: device-to-device copy
bandwidth (bytes read + written) and the bf16 matmul rate, through JAX. One JSON line."""
import json
import time

import jax
import jax.numpy as jnp


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
    m = 8192
    a = jax.random.normal(jax.random.PRNGKey(3), (m, m), jnp.bfloat16)
    b = jax.random.normal(jax.random.PRNGKey(4), (m, m), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    t2 = _median_time(mm, a, b)
    print(json.dumps(dict(kind="ceilings", device=jax.devices()[0].device_kind, copy_bytes_per_s=bw,
                          bf16_matmul_flops=2 * m ** 3 / t2)), flush=True)


if __name__ == "__main__":
    main()
