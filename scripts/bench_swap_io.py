"""What one swap chunk's transfers cost (runner._swap_out / _swap_in move kvc.BLOCK_CHUNK = 64
blocks of every layer at a time: 134 MB of Llama-3-8B), by route, pipelined over several chunks:

  d2h_asarray        np.asarray of the gathered device array (what the runner does now)
  d2h_pinned         jax.device_put to the device's pinned_host memory, then np.asarray of that
  h2d_put            jax.device_put of a numpy array (what _swap_in does now)
  h2d_pinned         numpy -> a pinned_host array -> the device
  pool_write_first   writing a chunk into a fresh host pool (page faults on first touch)
  pool_write_again   the same slots again
  scatter / gather / copy (with --cache-blocks N): kv_cache.scatter_blocks (swap-in's write),
                     gather_blocks (swap-out's read) and copy_blocks of one chunk on a cache of
                     N blocks per layer (donated, as the runner calls them), and whether the
                     compiled scatter touches the whole cache (a full-size copy or convert)

Prints one JSON line: seconds per chunk and GB/s per route (routes this backend lacks are
reported as errors). docs/benchmarks.md, 2026-12-01 (seventh session) has the first figures.

    python3 scripts/bench_swap_io.py [--chunks 8] [--cache-blocks 26700]
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
    ap.add_argument("--cache-blocks", type=int, default=0, help="also time the block ops on a cache this large")
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
    if a.cache_blocks:
        del xs, pool
        res.update(block_ops(shape, a.cache_blocks, a.chunks, nbytes))
    print(json.dumps(res), flush=True)


def block_ops(shape, num_blocks: int, chunks: int, nbytes: int) -> dict:
    """The runner's donated block ops on a cache of num_blocks blocks per layer, one chunk each."""
    from jaxserve.runner import kv_cache as kvc

    L, _, K, BS, H, D = shape
    kv = [jnp.zeros((2, num_blocks, BS, H, D), jnp.bfloat16) for _ in range(L)]
    data = jnp.ones((K, L, 2, BS, H, D), jnp.bfloat16)
    out = {}
    rng = np.random.default_rng(0)
    ids = [jnp.asarray(rng.choice(np.arange(1, num_blocks), K, replace=False).astype(np.int32)) for _ in range(chunks)]
    text = kvc.scatter_blocks.lower(kv, ids[0], data).compile().as_text()
    full = f"[2,{num_blocks},{BS},{H},{D}]"  # (as HLO prints the shape)
    ops = set()
    for ln in text.splitlines():  # instructions whose result is a whole layer's cache, but the scatter
        lhs, _, rhs = ln.partition(" = ")
        if rhs.startswith(("bf16" + full, "f32" + full)) and "scatter" not in lhs and " parameter(" not in rhs:
            ops.add(rhs.split("(")[0].split(" ")[-1])
    out["scatter_full_size_ops"] = sorted(ops)
    for name in ("scatter", "gather", "copy"):
        for _ in range(2):  # the first compiles
            jax.block_until_ready(kv)
            t0 = time.perf_counter()
            for i in range(chunks):
                if name == "scatter":
                    kv = kvc.scatter_blocks(kv, ids[i], data)
                elif name == "gather":
                    g = kvc.gather_blocks(kv, ids[i])
                else:
                    kv = kvc.copy_blocks(kv, ids[i], ids[(i + 1) % chunks])
            jax.block_until_ready(g if name == "gather" else kv)
            t = (time.perf_counter() - t0) / chunks
        out[name] = dict(s_per_chunk=round(t, 5), gb_per_s=round(nbytes / t / 1e9, 2))
    return out


if __name__ == "__main__":
    main()
