"""Long prompts that start in this step, as dense causal attention over the step's own K/V.

A sequence whose whole context is this step's queries (seq_len == its query count: a prompt's
first chunk with no prefix-cache hit) attends only to the K/V it brings itself, which sit
contiguous in the step's k / v [T, Hkv, D]. That needs no block table, and a dense flash-attention
kernel does it faster than the paged kernel's gathers: cuDNN's packed layout on Hopper (B = 1, one
segment per prompt, causal within each). H200, Llama-3-8B heads, scripts/bench_prefill_cudnn.py
(2026-12-01, sixth session): 8 x 1024 tokens 0.19 ms against the kernel's 0.28, 1 x 8192 1.00
against 1.51, but 64 x 128 0.11-0.13 against 0.13 (no gain), and cuDNN's time grows with the
segment count it is given (+0.2 ms for 1,024 padded segments). So only prompts of at least
MIN_LEN tokens take it, at most T // MIN_LEN of them per step, a static bound that padding
cannot exceed (each takes >= MIN_LEN of the T rows).

Contract: `segments` picks the prompts and packs their offsets / lengths; `dense` returns
[T, Hq, D] whose rows of picked prompts hold their attention and whose other rows are
unspecified (the paged kernel's launches store those, into the same buffer). `dense_reference`
is the same contract in jnp (tests on the CPU, where cuDNN is absent).
"""
from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np

MIN_LEN = 512  # shortest prompt given to the dense kernel (64 x 128 tokens: no gain, see above)

logger = logging.getLogger("jaxserve")


def max_segments(num_tokens: int, min_len: int = MIN_LEN) -> int:
    """Static bound on the prompts of one step that can take the dense path."""
    return num_tokens // min_len


def segments(seq_lens, query_start_loc, num_tokens: int, min_len: int = MIN_LEN):
    """seq_lens [S], query_start_loc [S + 1] int32 -> (take [S] bool, offsets [1, M + 1],
    lengths [1, M]) with M = max_segments(num_tokens): the taken prompts' first rows and query
    counts packed in order, -1 after them (cuDNN's packed-layout convention)."""
    m = max_segments(num_tokens, min_len)
    q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    take = (seq_lens == q_len) & (q_len >= min_len)
    slot = jnp.where(take, jnp.cumsum(take) - 1, m + 1)  # the rest land past the end: dropped
    offsets = jnp.full((m + 1,), -1, jnp.int32).at[slot].set(query_start_loc[:-1], mode="drop")
    lengths = jnp.full((m,), -1, jnp.int32).at[slot].set(q_len, mode="drop")
    return take, offsets[None], lengths[None]


def any_taken(seq_lens, query_start_loc, min_len: int = MIN_LEN) -> bool:
    """Host side (numpy), whether `segments` would take any prompt: the runner runs the variant
    with the dense path only for such steps."""
    q_len = np.diff(np.asarray(query_start_loc))
    return bool(np.any((np.asarray(seq_lens) == q_len) & (q_len >= min_len)))


def dense(q, k, v, offsets, lengths, *, sm_scale: float, impl: str):
    """q [T, Hq, D], k / v [T, Hkv, D] (this step's), offsets [1, M + 1], lengths [1, M] ->
    [T, Hq, D] in q's dtype; impl "cudnn" or "reference"."""
    if impl == "reference":
        return dense_reference(q, k, v, offsets, lengths, sm_scale=sm_scale)
    if impl != "cudnn":
        raise ValueError(f"dense prompt attention impl must be 'cudnn' or 'reference', got {impl!r}")
    from jax._src.cudnn import fused_attention_stablehlo as fa

    out = fa.dot_product_attention(q[None], k[None], v[None], None, None, lengths, lengths, offsets, offsets,
                                   scale=sm_scale, mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
    return out[0]


def dense_reference(q, k, v, offsets, lengths, *, sm_scale: float):
    """The contract in jnp, float32 softmax over a [Hq, T, T] score matrix (small T only). Rows
    outside every segment come out 0."""
    T, hq, d = q.shape
    g = hq // k.shape[1]
    starts, lens = offsets[0, :-1], lengths[0]  # [M]
    tok = jnp.arange(T, dtype=jnp.int32)
    inside = (lens[None, :] > 0) & (tok[:, None] >= starts[None, :]) & (tok[:, None] < (starts + lens)[None, :])
    seg = jnp.where(inside.any(1), jnp.argmax(inside, axis=1), -1)  # [T]
    mask = (seg[:, None] == seg[None, :]) & (seg[:, None] >= 0) & (tok[None, :] <= tok[:, None])  # [T, T]
    kf = jnp.repeat(k.astype(jnp.float32), g, axis=1)  # [T, Hq, D]
    vf = jnp.repeat(v.astype(jnp.float32), g, axis=1)
    s = jnp.einsum("thd,shd->hts", q.astype(jnp.float32) * sm_scale, kf, precision=jax.lax.Precision.HIGHEST)
    s = jnp.where(mask[None], s, -jnp.inf)
    p = jnp.exp(s - jnp.where(mask[None], s, -1e30).max(-1, keepdims=True))
    p = jnp.where(mask[None], p, 0.0)
    out = jnp.einsum("hts,shd->thd", p, vf, precision=jax.lax.Precision.HIGHEST)
    den = p.sum(-1).T[..., None]  # [T, Hq, 1]
    return (out / jnp.where(den > 0, den, 1.0)).astype(q.dtype)


@functools.cache
def cudnn_available() -> bool:
    """cuDNN's packed flash attention is there: an NVIDIA GPU of compute capability >= 9.0 (the
    packed layout needs Hopper) and cuDNN >= 9.1, through JAX's internal cuDNN module (no public
    JAX API takes segment offsets); anything else (another JAX layout of that module included)
    means the paged kernel does every prompt."""
    try:
        if jax.devices()[0].platform != "gpu":
            return False
        from jax._src.cudnn import fused_attention_stablehlo as fa

        ok = fa.check_cudnn_version() >= 90100 and fa.check_compute_capability("9.0")
    except Exception as e:  # noqa: BLE001 (absent or changed: fall back, say why once)
        logger.info("cuDNN packed attention unavailable (%s: %s); prompts use the paged kernel", type(e).__name__, e)
        return False
    return bool(ok)


def supported(dtype, head_dim: int, soft_cap, sliding_window) -> bool:
    """Whether a layer's prompts may take the cuDNN path: 16-bit q / K / V, head_dim <= 256 and a
    multiple of 8, no logit soft-cap and no sliding window (the kernel keeps those)."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim <= 256
            and head_dim % 8 == 0 and soft_cap is None and sliding_window is None and cudnn_available())
