"""Pieces shared by the Mosaic-GPU (Pallas' wgmma + TMA backend) kernels: swiglu_matmul and
int4_matmul/mgpu.py. Functions take the `plgpu` module (jax.experimental.pallas.mosaic_gpu),
imported by the caller inside its kernel builder, so importing this file needs no GPU support."""
from __future__ import annotations

import functools

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl


def smem_transforms(plgpu, cols: int, dtype):
    """The tiling + swizzle of a shared-memory tile whose rows hold `cols` elements of dtype (4-bit
    types included): the widest swizzle its row bytes allow, as TMA and wgmma read it."""
    bits = 4 if jnp.dtype(dtype) in (jnp.dtype(jnp.int4), jnp.dtype(jnp.uint4)) else jnp.dtype(dtype).itemsize * 8
    swizzle = plgpu.find_swizzle(cols * bits)
    return (plgpu.TilingTransform((8, swizzle * 8 // bits)), plgpu.SwizzleTransform(swizzle))


def pipeline_scope(pipeline, *gmem_refs):
    """Decorator for a persistent warp-specialized kernel's body: runs body(allocs, wg) at once with
    the pipeline's shared-memory buffers allocated once for all warpgroups (so the pipelines of
    successive tiles reuse them) and this thread's warpgroup index. pipeline(body, context) builds
    the pipeline; the allocations do not depend on its bodies."""
    unused = lambda *_, **__: None  # noqa: E731

    def scope(body):
        @functools.partial(pl.run_scoped, allocs=pipeline(unused, unused).get_allocations(*gmem_refs),
                           collective_axes="wg")
        def _scope(allocs):
            body(allocs, lax.axis_index("wg"))
    return scope
