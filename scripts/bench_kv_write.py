"""Time writing a step's new K/V into the paged cache, in one run: XLA's scatter
(reference.write_kv) against the Pallas kernel (kv_write.py, what the engine uses on GPUs), on one layer's
Llama-3-8B-shaped cache (8 KV heads x 128, block 16, bf16), with the cache donated so both write
in place. Token counts cover a decode step (1-256 tokens) and prefill steps (2048, 8192).
Each timed call is one jit doing 32 writes (one per layer of Llama-3-8B, each to its own slots)
and calls are dispatched back to back with one wait at the end, so the figure is device time
per write as inside the engine's jitted step, not host dispatch. One JSON line per token count.

    python3 scripts/bench_kv_write.py [--num-blocks 8192]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention.kv_write import write_kv_pallas
from pallas_kernels.ragged_paged_attention.reference import write_kv

HKV, D, BS = 8, 128, 16
LAYERS = 32


def layered(write):
    """One jit: LAYERS writes into the donated cache, each through its own slot array."""
    def f(kv, k, v, slot_list):
        for slots in slot_list:
            kv = write(kv, k, v, slots)
        return kv
    return jax.jit(f, donate_argnums=0)


def time_writes(f, kv, inputs, iters=20):
    """Seconds per write; f donates the cache, so the result is threaded through."""
    for a in inputs:
        kv = f(kv, *a)
    jax.block_until_ready(kv)
    t0 = time.perf_counter()
    for i in range(iters):
        kv = f(kv, *inputs[i % len(inputs)])
    jax.block_until_ready(kv)
    return (time.perf_counter() - t0) / iters / LAYERS, kv


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-blocks", type=int, default=8192)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 32, 256, 2048, 8192])
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    kv = jnp.zeros((2, a.num_blocks, BS, HKV, D), jnp.bfloat16)
    xla = layered(write_kv)
    pallas = layered(write_kv_pallas)
    for T in a.tokens:
        inputs = []
        for _ in range(2):
            slots = tuple(jnp.asarray(rng.permutation(np.arange(BS, a.num_blocks * BS))[:T], jnp.int32)
                          for _ in range(LAYERS))
            k = jnp.asarray(rng.standard_normal((T, HKV, D)), jnp.bfloat16)
            inputs.append((k, k * 2, slots))
        t_x, kv = time_writes(xla, kv, inputs)
        t_p, kv = time_writes(pallas, kv, inputs)
        # both write the same rows: check the Pallas result against XLA's on one input
        k, v, slots = inputs[0]
        ref = jax.jit(write_kv)(jnp.zeros_like(kv), k, v, slots[0])
        got = jax.jit(write_kv_pallas)(jnp.zeros_like(kv), k, v, slots[0])
        same = bool(jnp.array_equal(ref[:, 1:], got[:, 1:]))
        nbytes = 2 * 2 * T * HKV * D * 2  # K and V rows read once and written once
        print(json.dumps(dict(kind="kv_write", tokens=T, xla_scatter_us=t_x * 1e6, pallas_us=t_p * 1e6,
                              pallas_over_xla=t_p / t_x, xla_bytes_per_s=nbytes / t_x,
                              pallas_bytes_per_s=nbytes / t_p, identical=same)), flush=True)


if __name__ == "__main__":
    main()
