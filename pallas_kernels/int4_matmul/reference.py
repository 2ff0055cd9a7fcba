"""The contract of the 4-bit matmul: x [M, K] @ W, W given in groups of G input rows as

  qw [K/8, N] int32   eight 4-bit values per word: input row 8r + i is bits 4i..4i+3 of word r
  s  [K/G, N]         scales, z [K/G, N] zero points (values 0..15), in the activations' dtype
  W[k, n] = (nibble(k, n) - z[k // G, n]) * s[k // G, n]

(the GPTQ packing along the input dimension; jaxserve/models/int4.py converts AWQ's and GPTQ's
checkpoint tensors to it). Output [M, N] in x's dtype, accumulated in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

SHIFTS = np.arange(8, dtype=np.int32) * 4


def unpack(qw):
    """[K/8, N] int32 -> [K, N] int32 values 0..15."""
    nib = (qw[:, None, :] >> SHIFTS[None, :, None]) & 0xF  # [K/8, 8, N]
    return nib.reshape(qw.shape[0] * 8, qw.shape[1])


def pack(q):
    """[K, N] integers 0..15 -> [K/8, N] int32 (numpy or jax)."""
    xp = jnp if isinstance(q, jax.Array) else np
    q = q.astype(xp.uint32).reshape(q.shape[0] // 8, 8, q.shape[1])
    words = (q << xp.asarray(SHIFTS.astype(np.uint32))[None, :, None]).sum(axis=1, dtype=xp.uint32)
    return words.view(xp.int32) if xp is np else jax.lax.bitcast_convert_type(words, jnp.int32)


def dequantize(qw, s, z, dtype=jnp.float32):
    """-> W [K, N] in dtype."""
    groups = s.shape[0]
    q = unpack(qw).reshape(groups, -1, qw.shape[1]).astype(dtype)  # [K/G, G, N]
    return ((q - z.astype(dtype)[:, None]) * s.astype(dtype)[:, None]).reshape(-1, qw.shape[1])


def int4_matmul_reference(x, qw, s, z):
    """x [M, K] -> [M, N] in x's dtype: W widened to x's dtype, float32 accumulation."""
    w = dequantize(qw, s, z, x.dtype)
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
