"""The attention interface every model layer calls: write this step's K/V into the paged cache,
then attend over each sequence's blocks. The backend ("reference" jnp or "pallas" kernel) is a
static choice made by the runner; both share the layout documented in
pallas_kernels/ragged_paged_attention/reference.py.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax

from pallas_kernels.ragged_paged_attention.reference import (
    ragged_paged_attention_reference,
    write_kv,
)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: jax.Array  # [T] int32 cache slot of each token (padding -> null block 0)
    block_tables: jax.Array  # [S, MB] int32 (padding -> 0)
    seq_lens: jax.Array  # [S] int32 context length incl. this step (padding seqs -> 0)
    query_start_loc: jax.Array  # [S + 1] int32 cumulative query offsets


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """Static choice of attention implementation; with a mesh whose "model" axis is > 1 the
    attention runs per shard of heads (shard_map), since heads never talk to each other."""

    name: str  # "reference" | "pallas"
    mesh: Optional[object] = None  # jax.sharding.Mesh with a "model" axis
    # Long prompts that start in the step through cuDNN's dense flash attention (pallas only;
    # the runner compiles a variant with it for the steps that have such prompts, since a call
    # with none still costs ~40 us per layer: pallas_kernels/ragged_paged_attention/fresh_prompts.py)
    dense_prompts: bool = False


def paged_attention(
    q,  # [T, Hq, D]
    k,  # [T, Hkv, D]
    v,  # [T, Hkv, D]
    kv_cache,  # [2, NB, BS, Hkv, D]
    md: AttentionMetadata,
    *,
    backend,  # str or AttentionBackend
    sm_scale: float,
    soft_cap: Optional[float] = None,
    sliding_window: Optional[int] = None,
    dense_prompts: bool = False,
):
    """Returns (out [T, Hq, D], new kv_cache). dense_prompts: see AttentionBackend (set from it)."""
    if isinstance(backend, AttentionBackend):
        mesh = backend.mesh
        dense_prompts = backend.dense_prompts
        if mesh is not None and mesh.shape.get("model", 1) > 1:
            from jax.sharding import PartitionSpec as P

            heads = P(None, "model", None)
            cache = P(None, None, None, "model", None)
            fn = functools.partial(paged_attention, backend=backend.name, sm_scale=sm_scale, soft_cap=soft_cap,
                                   sliding_window=sliding_window, dense_prompts=dense_prompts)
            return jax.shard_map(fn, mesh=mesh, in_specs=(heads, heads, heads, cache, P()),
                                 out_specs=(heads, cache), check_vma=False)(q, k, v, kv_cache, md)
        backend = backend.name
    if backend == "reference":
        kv_cache = write_kv(kv_cache, k, v, md.slot_mapping)
        out = ragged_paged_attention_reference(
            q, kv_cache, md.block_tables, md.seq_lens, md.query_start_loc,
            sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window)
        return out, kv_cache
    if backend == "pallas":
        from pallas_kernels.ragged_paged_attention import fresh_prompts
        from pallas_kernels.ragged_paged_attention import kernel as _kernel

        kv_cache = _kernel.write_kv(kv_cache, k, v, md.slot_mapping)
        # Long prompts starting in this step: cuDNN's dense flash attention over this step's K/V
        # when the runner asked for it and cuDNN is there (fresh_prompts.py), the paged kernel for
        # everything else.
        dense = "cudnn" if dense_prompts and fresh_prompts.supported(q.dtype, q.shape[-1], soft_cap,
                                                                     sliding_window) else None
        out = _kernel.ragged_paged_attention(
            q, kv_cache, md.block_tables, md.seq_lens, md.query_start_loc, (k, v) if dense else None,
            sm_scale=sm_scale, soft_cap=soft_cap, sliding_window=sliding_window, dense_prompts=dense)
        return out, kv_cache
    raise ValueError(f"unknown attention backend {backend!r}")
