"""What one swap chunk's transfers cost (runner._swap_out / _swap_in move kvc.BLOCK_CHUNK = 64
blocks of every layer at a time: 134 MB of Llama-3-8B), by route, pipelined over several chunks:

  d2h_asarray        np.asarray of the gathered device array (what the runner does now)
  d2h_pinned         jax.device_put to the device's pinned_host memory, then np.asarray of that
  h2d_put            jax.device_put of a numpy array (what _swap_in does now)
  h2d_pinned         numpy -> a pinned_host array -> the device
  pool_write_first   writing a chunk into a fresh host pool (page faults on first touch)
  pool_write_again   the same slots again

Prints one JSON line: seconds per chunk and GB/s per route (routes this backend lacks are
reported as errors). docs/benchmarks.md, 2026-12-01 (seventh session) has the first figures.

    python3 scripts/bench_swap_io.py [--chunks 8]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

SHAPE = (32, 2, 64, 16, 8, 128)  # layers, K/V, blocks, block size, KV heads, head dim


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--shape", type=int, nargs=6, default=list(SHAPE))
    a = ap.parse_args()
    shape = tuple(a.shape)
    nbytes = int(np.prod(shape)) * 2
    dev = jax.devices()[0]
    xs = [jnp.full(shape, i, jnp.bfloat16) for i in range(a.chunks)]
    jax.block_until_ready(xs)
    host = np.asarray(xs[0])
    res = dict(kind="swap_io", device=dev.device_kind, chunk_bytes=nbytes)

    def route(name, fn):
        try:
            fn()  # warm
            t0 = time.perf_counter()
            fn()
            t = (time.perf_counter() - t0) / a.chunks
            res[name] = dict(s_per_chunk=round(t, 5), gb_per_s=round(nbytes / t / 1e9, 2))
        except Exception as e:  # a memory kind this backend lacks
            res[name] = dict(error=str(e)[:160])

    def d2h_asarray():
        for x in xs:
            np.asarray(x + 0)  # a fresh array each time: nothing cached on the host

    def d2h_pinned():
        pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        outs = [jax.device_put(x + 0, pinned) for x in xs]  # all dispatched, then read
        for o in outs:
            np.asarray(o)

    def h2d_put():
        jax.block_until_ready([jax.device_put(host) for _ in range(a.chunks)])

    def h2d_pinned():
        pinned = jax.sharding.SingleDeviceSharding(dev, memory_kind="pinned_host")
        on_device = jax.sharding.SingleDeviceSharding(dev, memory_kind=dev.default_memory().kind)
        staged = jax.device_put(host, pinned)
        jax.block_until_ready([jax.device_put(staged, on_device) for _ in range(a.chunks)])

    route("d2h_asarray", d2h_asarray)
    route("d2h_pinned", d2h_pinned)
    route("h2d_put", h2d_put)
    route("h2d_pinned", h2d_pinned)
    pool = np.zeros(shape[:2] + (shape[2] * 2 * (a.chunks + 1),) + shape[3:], np.asarray(host).dtype)
    slots = [list(range(i * shape[2], (i + 1) * shape[2])) for i in range(2 * a.chunks + 2)]
    t0 = time.perf_counter()
    for i in range(a.chunks):
        pool[:, :, slots[2 * i]] = host
    t = (time.perf_counter() - t0) / a.chunks
    res["pool_write_first"] = dict(s_per_chunk=round(t, 5), gb_per_s=round(nbytes / t / 1e9, 2))
    t0 = time.perf_counter()
    for i in range(a.chunks):
        pool[:, :, slots[2 * i]] = host
    t = (time.perf_counter() - t0) / a.chunks
    res["pool_write_again"] = dict(s_per_chunk=round(t, 5), gb_per_s=round(nbytes / t / 1e9, 2))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
