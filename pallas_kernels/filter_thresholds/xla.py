"""The kernel's radix search written in XLA ops, for small batches on GPUs (contract: reference.py).

With few rows the Pallas kernel (one program per row) leaves most SMs idle, while XLA spreads each
pass's [S, 2^bits, V] comparisons over the whole GPU: on an H200 at 16 / 32 / 64 rows x 128,256 the
2-bit form took 0.21 / 0.34 / 0.62 ms against the sort's 0.52 / 0.94 / 1.09 and the kernel's 0.87 /
0.89 / 0.91 (4 bits: 0.24 / 0.43 / 0.82; 2026-12-01, scripts/bench_filter_radix.py); from 128 rows
it is slower than both (2.22 ms against 1.33 and 1.23), every pass reading the rows again through
XLA's reductions. XLA's CPU backend materializes the comparisons (GiBs at a large vocabulary):
GPUs only.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from .reference import INT32_MIN, effective_top_k, order_keys


@functools.partial(jax.jit, static_argnames=("bits",))
def radix_thresholds(x, inv_temp, top_k, top_p, *, bits: int = 2):
    """x [S, V] float32, inv_temp [S] float32 (> 0), top_k [S] int32 (<= 0 or >= V: off), top_p
    [S] float32 (>= 1: off) -> (threshold [S] int32 order keys, row max [S] float32), as
    kernel.filter_thresholds: one search for the largest T with count(key > T) >= k or
    mass(key > T) >= top_p * total, `bits` bits per pass."""
    if 32 % bits:
        raise ValueError(f"bits must divide 32, got {bits}")
    s, v = x.shape
    x = x.astype(jnp.float32)
    keys = order_keys(x)  # [S, V]
    m = x.max(-1)
    p = jnp.exp((x - m[:, None]) * inv_temp[:, None])  # [S, V]
    k = effective_top_k(top_k, v)
    k_on, p_on = k < v, top_p < 1.0
    target = jnp.where(p_on, top_p * p.sum(-1), jnp.inf)
    digits = jnp.arange(1 << bits, dtype=jnp.int32)
    prefix = jnp.zeros((s,), jnp.int32)  # unsigned order, as int32 bit patterns
    for shift in range(32 - bits, -1, -bits):
        cand = (prefix[:, None] + (digits << shift)[None, :]) ^ INT32_MIN  # [S, R] signed order
        above = keys[:, None, :] > cand[:, :, None]  # [S, R, V] (fused into the reductions on GPUs)
        cnt = jnp.sum(above, axis=-1, dtype=jnp.int32)
        mass = jnp.sum(jnp.where(above, p[:, None, :], 0.0), axis=-1)
        holds = (k_on[:, None] & (cnt >= k[:, None])) | (mass >= target[:, None])  # [S, R]
        prefix = prefix + (jnp.maximum(jnp.sum(holds, axis=-1, dtype=jnp.int32) - 1, 0) << shift)
    found = jnp.where(k_on | p_on, prefix ^ INT32_MIN, INT32_MIN)
    return jnp.minimum(found, order_keys(m) - 1), m
