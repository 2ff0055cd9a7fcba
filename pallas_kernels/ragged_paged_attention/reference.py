"""Plain-jnp ragged paged attention: the oracle for the kernel's tests and the CPU path.

Layout contract (shared with the Pallas kernel and the engine):
  kv_cache        [2, num_blocks, block_size, num_kv_heads, head_dim]   (K at index 0, V at 1)
  q               [num_tokens, num_q_heads, head_dim]  packed by sequence, sequence i owns
                  q[query_start_loc[i] : query_start_loc[i + 1]]
  block_tables    [num_seqs, max_blocks_per_seq] int32, padded with 0 (the null block)
  seq_lens        [num_seqs] int32: context length of each sequence *including* this step's
                  tokens; its queries are the last (query_start_loc[i+1] - query_start_loc[i])
                  positions of that context. Padding sequences have seq_len 0 and no queries.
  query_start_loc [num_seqs + 1] int32, non-decreasing, query_start_loc[0] == 0.
Tokens at or past query_start_loc[-1] are padding: their output is zeros.
Attention is causal within each sequence; the K/V of this step's tokens must already be in the
cache (write_kv first).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)


def to_cache_dtype(x, dtype):
    """x in the cache's element type; float8 caches store K/V unscaled, clipped to the format's
    finite range (a plain cast would turn e4m3's out-of-range values into NaN)."""
    dtype = jnp.dtype(dtype)
    if dtype in FP8_DTYPES:
        lim = float(jnp.finfo(dtype).max)
        x = jnp.clip(x.astype(jnp.float32), -lim, lim)
    return x.astype(dtype)


def _bits(x):
    """A float8 array viewed as uint8 (same bits), anything else as is. Backends without native
    float8 arithmetic (XLA on CPU) widen a float8 operand of a scatter, gather or loop to float16
    *whole*; on the uint8 view those ops move bytes, and only the gathered blocks are widened."""
    return jax.lax.bitcast_convert_type(x, jnp.uint8) if x.dtype in FP8_DTYPES else x


def _unbits(x, dtype):
    return jax.lax.bitcast_convert_type(x, dtype) if jnp.dtype(dtype) in FP8_DTYPES else x


def write_kv(kv_cache, k, v, slot_mapping):
    """Scatter this step's K/V into their cache slots.

    kv_cache      [2, num_blocks, block_size, num_kv_heads, head_dim]
    k, v          [num_tokens, num_kv_heads, head_dim]
    slot_mapping  [num_tokens] int32: block_id * block_size + offset. Padding tokens point into
                  the null block 0, which is never read unmasked.
    """
    two, nb, bs, hkv, d = kv_cache.shape
    flat = _bits(kv_cache).reshape(two, nb * bs, hkv, d)
    kv = _bits(to_cache_dtype(jnp.stack([k, v]), kv_cache.dtype))  # [2, T, Hkv, D]
    flat = flat.at[:, slot_mapping].set(kv)
    return _unbits(flat.reshape(two, nb, bs, hkv, d), kv_cache.dtype)


def token_layout(query_start_loc, seq_lens, num_tokens):
    """Per-token sequence index, position in its sequence and validity.

    Returns seq_idx [T] int32, pos [T] int32, valid [T] bool.
    """
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    num_seqs = seq_lens.shape[0]
    seq_idx = jnp.searchsorted(query_start_loc, t, side="right", method="compare_all").astype(jnp.int32) - 1
    seq_idx = jnp.clip(seq_idx, 0, num_seqs - 1)
    valid = t < query_start_loc[-1]
    q_len = query_start_loc[seq_idx + 1] - query_start_loc[seq_idx]
    pos = seq_lens[seq_idx] - q_len + (t - query_start_loc[seq_idx])
    return seq_idx, pos, valid


def ragged_paged_attention_reference(
    q,  # [T, Hq, D]
    kv_cache,  # [2, NB, BS, Hkv, D]
    block_tables,  # [S, MB] int32
    seq_lens,  # [S] int32
    query_start_loc,  # [S + 1] int32
    *,
    sm_scale: float,
    soft_cap: Optional[float] = None,
    sliding_window: Optional[int] = None,
):
    """Attention of every query token over its own sequence's cached context (online softmax
    over KV blocks, float32 accumulation). Returns [T, Hq, D] in q's dtype."""
    T, hq, d = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    g = hq // hkv
    seq_idx, pos, valid = token_layout(query_start_loc, seq_lens, T)
    qg = q.reshape(T, hkv, g, d).astype(jnp.float32) * sm_scale
    my_blocks = block_tables[seq_idx]  # [T, MB]
    ctx = jnp.where(valid, seq_lens[seq_idx], 0)  # [T]
    n_blocks = (jnp.max(ctx) + bs - 1) // bs
    # Float32 inputs get true float32 products (XLA's default on GPUs rounds them to TF32).
    prec = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
    cache_bits = _bits(kv_cache)

    def body(j, carry):
        m, l, acc = carry  # [T,Hkv,G], [T,Hkv,G], [T,Hkv,G,D]
        blk = my_blocks[:, j]  # [T]
        k = _unbits(cache_bits[0, blk], kv_cache.dtype).astype(jnp.float32)  # [T, BS, Hkv, D]
        v = _unbits(cache_bits[1, blk], kv_cache.dtype).astype(jnp.float32)
        s = jnp.einsum("thgd,tbhd->thgb", qg, k, precision=prec)  # [T, Hkv, G, BS]
        if soft_cap is not None:
            s = soft_cap * jnp.tanh(s / soft_cap)
        kpos = j * bs + jnp.arange(bs, dtype=jnp.int32)  # [BS]
        mask = (kpos[None, :] <= pos[:, None]) & (kpos[None, :] < ctx[:, None])
        if sliding_window is not None:
            mask &= kpos[None, :] > pos[:, None] - sliding_window
        s = jnp.where(mask[:, None, None, :], s, -jnp.inf)
        m_new = jnp.maximum(m, s.max(-1))
        m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
        p = jnp.exp(s - m_safe[..., None])
        alpha = jnp.exp(jnp.where(jnp.isfinite(m), m - m_safe, -jnp.inf))
        l = l * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + jnp.einsum("thgb,tbhd->thgd", p, v, precision=prec)
        return m_new, l, acc

    init = (
        jnp.full((T, hkv, g), -jnp.inf, jnp.float32),
        jnp.zeros((T, hkv, g), jnp.float32),
        jnp.zeros((T, hkv, g, d), jnp.float32),
    )
    _, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.where(l > 0, l, 1.0)[..., None]
    out = jnp.where(valid[:, None, None, None], out, 0.0)
    return out.reshape(T, hq, d).astype(q.dtype)
