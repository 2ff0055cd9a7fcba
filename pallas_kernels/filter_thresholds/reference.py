"""The contract of filter_thresholds, in plain jnp (a sort per row): what the kernel must return.

Order keys: float32 -> int32 with the floats' order (signed comparison), -0.0 and 0.0 one key,
-inf the lowest finite-or-infinite key; NaN is not expected. A row keeps the tokens whose key is
greater than its threshold:
  top-k: the largest T with count(key > T) >= k (the k largest and every tie of the k-th);
  top-p: the largest T with sum(p[key > T]) >= top_p * sum(p), p = exp((x - max) * inv_temp)
         (the fewest largest tokens whose probability reaches top_p, with their ties);
  threshold = min(max(top-k's, top-p's), key(max) - 1): the most likely token always stays.
k >= V (or <= 0) and top_p >= 1 turn their filter off (threshold INT32_MIN: every token stays).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

INT32_MIN = -(2 ** 31)


def order_keys(x):
    """float32 [...] -> int32 [...] in the same order (signed comparison)."""
    b = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x.astype(jnp.float32)), jnp.int32)
    return b ^ ((b >> 31) & jnp.int32(0x7FFFFFFF))


def effective_top_k(top_k, v: int):
    """top_k [S] int32 -> [S] int32 in [1, V]: V where the filter is off (<= 0 or >= V)."""
    return jnp.where((top_k > 0) & (top_k < v), top_k, v).astype(jnp.int32)


@jax.jit
def filter_thresholds_reference(x, inv_temp, top_k, top_p):
    """x [S, V] float32 logits, inv_temp [S] float32 (> 0), top_k [S] int32, top_p [S] float32
    -> (threshold [S] int32 in order-key space, row max [S] float32)."""
    s, v = x.shape
    keys = order_keys(x)
    desc = -jnp.sort(-keys, axis=-1)  # [S, V] keys, largest first
    m = x.max(-1)
    k = effective_top_k(top_k, v)
    tk = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)[:, 0] - 1
    tk = jnp.where(k >= v, INT32_MIN, tk)
    e = jnp.exp((jnp.sort(x, axis=-1)[:, ::-1] - m[:, None]) * inv_temp[:, None])  # [S, V] desc
    before = jnp.cumsum(e, axis=-1) - e
    n = jnp.maximum(jnp.sum(before < (top_p * e.sum(-1))[:, None], axis=-1), 1)
    tp = jnp.take_along_axis(desc, (n - 1)[:, None], axis=-1)[:, 0] - 1
    tp = jnp.where(top_p >= 1.0, INT32_MIN, tp)
    return jnp.minimum(jnp.maximum(tk, tp), desc[:, 0] - 1), m
