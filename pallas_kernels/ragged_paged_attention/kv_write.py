"""Writing a step's new K/V into their cache slots as a Pallas kernel (Triton on NVIDIA GPUs,
interpret mode on CPU), the alternative to XLA's scatter in reference.write_kv.

One program stores `tokens_per_program` tokens of one KV head: it loads their slot ids and K/V
rows and scatter-stores them through the slot ids into the cache viewed as [2, NB*BS, Hkv, D].
The cache is aliased input -> output, so under a jit that donates it the write is in place.
Which of the two the engine uses is decided by measurement (docs/kernels.md).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import to_cache_dtype


def _kernel(slot_ref, k_ref, v_ref, _kv_in_ref, kv_ref, *, tb: int):
    i = pl.program_id(0)
    h = pl.program_id(1)
    rows = pl.ds(i * tb, tb)
    slots = slot_ref[rows]  # [TB]
    kv_ref[0, slots, h, :] = k_ref[rows, h, :]  # [TB, D] rows to their slots (already the cache dtype)
    kv_ref[1, slots, h, :] = v_ref[rows, h, :]


@functools.partial(jax.jit, static_argnames=("interpret", "tokens_per_program"), donate_argnums=0)
def write_kv_pallas(kv_cache, k, v, slot_mapping, *, interpret=None, tokens_per_program: int = 16):
    """kv_cache [2, NB, BS, Hkv, D]; k, v [T, Hkv, D]; slot_mapping [T] int32 -> the cache with
    the T rows written (semantics of reference.write_kv; padding tokens point into block 0)."""
    two, nb, bs, hkv, d = kv_cache.shape
    T = k.shape[0]
    if k.shape != v.shape or k.shape[1:] != (hkv, d) or slot_mapping.shape != (T,):
        raise ValueError(f"k {k.shape}, v {v.shape} and slot_mapping {slot_mapping.shape} must be "
                         f"[T, {hkv}, {d}], [T, {hkv}, {d}] and [T]")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    tb = tokens_per_program
    pad = -T % tb
    if pad:  # extra rows write zeros into slot 0 of the null block, which is never read unmasked
        k = jnp.pad(k, ((0, pad), (0, 0), (0, 0)))
        v = jnp.pad(v, ((0, pad), (0, 0), (0, 0)))
        slot_mapping = jnp.pad(slot_mapping, (0, pad))
    flat = kv_cache.reshape(two, nb * bs, hkv, d)
    k, v = to_cache_dtype(k, flat.dtype), to_cache_dtype(v, flat.dtype)  # cast (and clip) in XLA
    full = lambda shape: pl.BlockSpec(shape, lambda i, h: (0,) * len(shape))  # noqa: E731
    kwargs = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=4, num_stages=1)}
    out = pl.pallas_call(
        functools.partial(_kernel, tb=tb),
        grid=((T + pad) // tb, hkv),
        in_specs=[full(slot_mapping.shape), full(k.shape), full(v.shape), full(flat.shape)],
        out_specs=full(flat.shape),
        out_shape=jax.ShapeDtypeStruct(flat.shape, flat.dtype),
        input_output_aliases={3: 0},
        interpret=interpret,
        name="write_kv",
        **kwargs,
    )(slot_mapping, k, v, flat)
    return out.reshape(two, nb, bs, hkv, d)
