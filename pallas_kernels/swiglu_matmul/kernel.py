"""silu(x @ W_gate) * (x @ W_up) -> [T, F] in one Mosaic-GPU kernel for Hopper (sm_90a). Contract:
reference.py.

Status: measured, not used by the engine. On an H200 (docs/benchmarks.md, 2026-12-01 twelfth
session, call 2) it ran 0.95-0.98x XLA's gate+up product + gate at 1,024-8,192 rows (its wgmma
product at 785-797 TFLOP/s against cuBLAS' 810-830, the saved elementwise pass the difference),
but wired into the MLP for steps of 512+ rows it left Llama-3-8B's 128 / 128 and 1024 / 128 where
they were (0.999x / 1.003x, same call) and tripled the warm-up's compile time (108 s against ~30 s:
one Mosaic-GPU compilation per call site). Kept, with scripts/bench_swiglu.py, as the starting point
for a faster product (2-CTA clusters, 256-wide tiles) or a mixed-type (4-bit) variant.

Why: the engine's MLP runs the gate+up product (a [T, 2F] bf16 result written out), then an
elementwise pass that reads it and writes [T, F]. On an H200 that pass is 5-6% of the gate+up
product's time at 1,024-8,192 rows, and fusing it into a Triton-lowered Pallas GEMM lost 14-19% on
the product itself (docs/benchmarks.md, 2026-12-01 third session). Mosaic GPU's wgmma + TMA products
run at cuBLAS' rate at these shapes (twelfth session, call 1), so here the gate is applied in the
product's epilogue and only [T, F] is written.

Shape of the work: a persistent grid of one CTA per SM walks output tiles of TM rows x TF features
(planar snake order). Per tile, a producer warpgroup streams, per TK-wide slice of E, x [TM, TK],
W_gate [TK, TF] and W_up [TK, TF] into shared memory (TMA, `stages` deep); two consumer warpgroups
each own TF/2 of the tile's features and keep two float32 accumulators [TM, TF/2] (gate, up) fed by
wgmma from shared memory. The epilogue computes silu(g) * u in registers and stores bf16 tiles of
[64, 64] through shared memory (TMA).

Registers: 2 x TM x TF/2 float32 per consumer warpgroup (TM = TF = 128: 128 per thread). Shared
memory per stage: (TM + 2 TF) x TK x 2 bytes (48 KiB at 128 / 128 / 64).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.mosaic_common import pipeline_scope, smem_transforms

EPI = 64  # epilogue tile: [64, 64] bf16, one 128-byte swizzled TMA box row per row


@dataclasses.dataclass(frozen=True)
class Config:
    tile_m: int = 128  # rows of x per tile (both consumer warpgroups)
    tile_f: int = 128  # output features per tile (TF/2 per consumer warpgroup)
    tile_k: int = 64  # slice of E per pipeline step
    stages: int = 3  # pipeline depth (shared-memory buffers per input)
    snake_minor: int = 1  # planar_snake's minor dimension: 0 = rows, 1 = features
    snake_width: int = 8


def supported(t: int, e: int, f: int, dtype, cfg: Config = Config()) -> bool:
    """Shapes the kernel takes: 16-bit floats, every dimension a multiple of its tile."""
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and t % cfg.tile_m == 0 and f % cfg.tile_f == 0 and e % cfg.tile_k == 0
            and cfg.tile_f % (2 * EPI) == 0 and cfg.tile_m % EPI == 0)


def swiglu_matmul(x, w, *, cfg: Config = Config(), num_sms: int | None = None, interpret=None):
    """x [T, E], w [E, 2, F] (0 = gate, 1 = up) -> silu(x @ w[:, 0]) * (x @ w[:, 1]) [T, F] in x's dtype.
    num_sms: the persistent grid's size (default: the device's SM count). interpret: None, or jax's
    Mosaic-GPU interpret parameters (runs the kernel on the CPU: tests)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    if x.ndim != 2 or w.ndim != 3 or w.shape[0] != x.shape[1] or w.shape[1] != 2 or w.dtype != x.dtype:
        raise ValueError(f"swiglu_matmul: x {x.shape} {x.dtype} and w {w.shape} {w.dtype} do not match "
                         f"(want x [T, E] and w [E, 2, F] in x's dtype)")
    (t, e), f = x.shape, w.shape[2]
    if not supported(t, e, f, x.dtype, cfg):
        raise ValueError(f"swiglu_matmul: T={t}, E={e}, F={f} ({x.dtype}) not supported by {cfg} (16-bit floats, "
                         f"T % {cfg.tile_m}, F % {cfg.tile_f}, E % {cfg.tile_k} == 0)")
    if num_sms is None:
        num_sms = jax.devices()[0].core_count if interpret is None else 2
    dtype = x.dtype
    tm, tf, tk = cfg.tile_m, cfg.tile_f, cfg.tile_k
    half = tf // 2
    m_iters, f_iters, k_iters = t // tm, f // tf, e // tk
    x_tr = smem_transforms(plgpu, tk, dtype)
    w_tr = smem_transforms(plgpu, tf, dtype)
    o_tr = smem_transforms(plgpu, EPI, dtype)
    w2 = w.reshape(e, 2 * f)  # gate features in columns [0, F), up in [F, 2F)

    def pipeline(body, context):
        spec = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40,
            in_specs=[spec((tm, tk), lambda k: (0, k), transforms=x_tr),
                      spec((tk, tf), lambda k: (k, 0), transforms=w_tr),
                      spec((tk, tf), lambda k: (k, 0), transforms=w_tr)],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=cfg.stages, compute_context=context)

    def kernel(x_gmem, w_gmem, out_gmem, out_smem):
        @pipeline_scope(pipeline, x_gmem, w_gmem, w_gmem)
        def _scope(allocs, wg):
            @plgpu.nd_loop((m_iters * f_iters,), collective_axes="sm")
            def _tile(info):
                (lin,) = info.index
                mi, fi = plgpu.planar_snake(lin, (m_iters, f_iters), cfg.snake_minor, cfg.snake_width)
                rows = pl.ds(mi * tm, tm)
                mine = pl.ds(wg * half, half)  # this warpgroup's features within the tile

                def context(run):
                    @functools.partial(pl.run_scoped, acc_g=plgpu.ACC((tm, half), jnp.float32),
                                       acc_u=plgpu.ACC((tm, half), jnp.float32))
                    def _accs(acc_g, acc_u):
                        run((acc_g, acc_u))
                        g, u = acc_g[...], acc_u[...]
                        h = (g / (1.0 + jnp.exp(-g)) * u).astype(dtype)  # [TM, TF/2]
                        plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the last tile's stores have read out_smem
                        n = 0
                        for em in range(tm // EPI):
                            for ef in range(half // EPI):
                                slot = n % 2
                                plgpu.wait_smem_to_gmem(1, wait_read_only=True)  # this slot's previous store
                                out_smem[wg, slot] = h[em * EPI:(em + 1) * EPI, ef * EPI:(ef + 1) * EPI]
                                plgpu.commit_smem()
                                col = fi * tf + wg * half + ef * EPI
                                plgpu.copy_smem_to_gmem(
                                    out_smem.at[wg, slot],
                                    out_gmem.at[pl.ds(mi * tm + em * EPI, EPI), pl.ds(col, EPI)])
                                n += 1

                def step(_, x_s, g_s, u_s, accs):
                    acc_g, acc_u = accs
                    plgpu.wgmma(acc_g, x_s, g_s.at[:, mine])
                    plgpu.wgmma(acc_u, x_s, u_s.at[:, mine])
                    plgpu.wgmma_wait(0)
                    return accs

                pipeline(step, context)(x_gmem.at[rows, :], w_gmem.at[:, pl.ds(fi * tf, tf)],
                                        w_gmem.at[:, pl.ds(f + fi * tf, tf)], allocations=allocs)

        plgpu.wait_smem_to_gmem(0, wait_read_only=True)

    call = plgpu.kernel(
        kernel, out_type=jax.ShapeDtypeStruct((t, f), dtype), grid=(num_sms,), grid_names=("sm",),
        num_threads=3, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        scratch_types=dict(out_smem=plgpu.SMEM((2, 2, EPI, EPI), dtype, transforms=o_tr)),
        **({} if interpret is None else {"interpret": interpret}))
    return call(x, w2)

