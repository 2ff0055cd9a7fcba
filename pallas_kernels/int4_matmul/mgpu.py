"""x [M, K] @ W (4-bit groups) for decode-sized steps in one Mosaic-GPU kernel (Hopper, sm_90a): the
weights are wgmma's register operand, widened and scaled in registers. Contract: reference.py (same
values; this kernel takes the weight in its own layout, made once by `to_rows`).

Why: kernel.py (Triton lowering) streams 4-bit bytes at ~1 TB/s, bound by the widening and by the
shuffles that put the widened tile into the product's operand layout, which Triton does not let a
kernel choose. Mosaic GPU does: a probe with this structure ran gate+up at 16 / 32 / 64 rows in
0.80x / 0.63x / 0.56x kernel.py's time on an H200 (scripts/bench_int4_mgpu_probe.py,
docs/benchmarks.md 2026-12-01 twelfth session). This kernel (thirteenth session, H200): gate+up
0.81x / 0.59x kernel.py's time at 1 / 64 rows, down 0.76x / 0.60x, decode's 32-layer stream 0.83x;
in the engine (jaxserve/models/int4.py `with_rows`, the default on one Hopper GPU since the fourteenth
session) batch-1 decode 1.18x, batch 32 1.37x. Its own ceiling so far: ~1.8 TB/s of 4-bit bytes
(bf16 weights stream at ~3-4 TB/s).

Layout (`to_rows`): wq [N, K] int4, K innermost, holding v - 8 (the unsigned nibble v made signed);
zs [2, K/G, N] in the activations' dtype: the zero point minus 8, and the scale, so that
(wq - (z - 8)) * s = (v - z) * s exactly as the reference computes it (the difference of two small
integers is exact in 16-bit floats; one rounding at the product). `to_rows(order="quads")` stores wq's
runs of four words byte-transposed (`quads`) for the "quads" loads, which widen four pairs per
32-bit word without shuffles (opt-in: 0.84x the products' time in a decode step on an H200, but
the engine's 4-bit decode is bound by the host's dispatch of a step; docs/kernels.md).

Work: out^T [N, M] = W [N, K] @ x^T [K, M]. A CTA's consumer warpgroups (2, or 3) own 64 rows of N each
(wgmma's M); x's rows are wgmma's N (M padded to a multiple of 8, at most 256), so small steps
waste no products. The K axis is split into `splits` slices so that narrow projections (N = 4,096:
32 tiles of 128) still fill the SMs; each (tile, slice) writes float32 partial sums [N, M] and one
XLA fusion adds the slices, transposes and rounds. A producer warpgroup streams W [128, TK] (4-bit),
x [M, TK] and the tile's zero points and scales through shared memory (TMA, `stages` deep); the
persistent grid (one CTA per SM) walks the (tile, slice) pairs.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels.mosaic_common import pipeline_scope, smem_transforms

ROWS_PER_WG = 64  # weight rows (output features) per consumer warpgroup: wgmma's M
TK = 128  # inputs per pipeline step: one group of 128, or part of a larger group
MAX_ROWS = 256  # wgmma's N
WARPGROUPS = (2, 3)  # consumer warpgroups a CTA may have (4 lowered but hung in the engine: not debugged)
SMEM_BUDGET = 200 * 1024  # of the 227 KiB a Hopper CTA may use: the rest for barriers and the epilogue


ORDERS = ("rows", "quads")  # wq's storage along K: plain, or quads() (what the "quads" loads read)


def to_rows(words, s, z, order: str = "rows"):
    """The engine's layout (words [K/8, N...] int32, nibble i of word r = input 8r + i; s, z [K/G, N...])
    -> (wq [N, K] int4 holding v - 8, zs [2, K/G, N] = (z - 8, s) in s's dtype); N... flattened.
    order "quads": wq's K axis stored as quads() gives it (the "quads" loads' layout)."""
    if order not in ORDERS:
        raise ValueError(f"to_rows: order={order!r}; one of {ORDERS}")
    kw8 = words.shape[0]
    words, s, z = words.reshape(kw8, -1), s.reshape(s.shape[0], -1), z.reshape(z.shape[0], -1)
    n = words.shape[1]
    flipped = jnp.bitwise_xor(words.T, jnp.int32(-0x77777778))  # 0x88888888: each nibble v -> v - 8 (signed)
    wq = lax.bitcast_convert_type(flipped, jnp.int4).reshape(n, kw8 * 8)  # nibble i of a word is element i
    return (quads(wq) if order == "quads" else wq), jnp.stack([z.astype(s.dtype) - 8, s])


def quads(wq):
    """wq [N, K] int4 -> the same values with each row's runs of 32 inputs (four 32-bit words) stored
    as a 4 x 4 byte transpose: word l, byte k <- word k, byte l. Its own inverse. Why: wgmma's
    register layout gives thread (lane % 4 = l) of a row the input pairs 8c + 2l, 8c + 2l + 1 of
    every 8-input column block c; after this transpose those of blocks 4q..4q+3 are one 32-bit word
    (word l of run q), which Mosaic GPU's WGMMA_UPCAST_4X layout loads whole: one load and one
    shift give four input pairs, with no shuffle between threads (_widen_quads)."""
    n, k = wq.shape
    if k % 32:
        raise ValueError(f"quads: K={k} must be a multiple of 32")
    u = lax.bitcast_convert_type(lax.bitcast_convert_type(wq.reshape(n, k // 8, 8), jnp.int32), jnp.uint32)
    u = u.reshape(n, k // 32, 4, 1)  # [N, runs, word k, 1]
    sh = jnp.arange(4, dtype=jnp.uint32) * 8
    b = (u >> sh) & 0xFF  # [N, runs, word k, byte l]
    t = (jnp.swapaxes(b, -1, -2) << sh).sum(-1, dtype=jnp.uint32)  # word l = sum_k (byte l of word k) << 8k
    t = lax.bitcast_convert_type(t.reshape(n, k // 8), jnp.int32)
    return lax.bitcast_convert_type(t, jnp.int4).reshape(n, k)


def reference(x, wq, zs, order: str = "rows"):
    """x [M, K] @ the weight in `to_rows`' layout in XLA ops -> [M, N] in x's dtype: the same widened
    values as reference.dequantize of the words it came from, float32 accumulation."""
    wq = quads(wq) if order == "quads" else wq
    rep = lambda a: jnp.repeat(a.astype(x.dtype), wq.shape[1] // a.shape[0], axis=0).T  # noqa: E731 [N, K]
    w = (wq.astype(x.dtype) - rep(zs[0])) * rep(zs[1])  # [N, K]
    return lax.dot_general(x, w, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


def supported(m: int, k: int, n: int, groups: int, wgs: int = 2) -> bool:
    return 0 < m <= MAX_ROWS and n % (ROWS_PER_WG * wgs) == 0 and k % TK == 0 and k % groups == 0 and (k // groups) % TK == 0


def valid_split(k: int, groups: int, splits: int, tk: int = TK) -> bool:
    """A slice is a whole number of tk-input steps and holds whole groups or lies inside one."""
    if k % splits:
        return False
    ks, g = k // splits, k // groups
    return ks % tk == 0 and (ks % g == 0 or g % ks == 0) and (tk % g == 0 or g % tk == 0)


def default_splits(n: int, k: int, groups: int, num_sms: int, tk: int = TK, fill: str = "cover", wgs: int = 2) -> int:
    """K slices: "cover": the fewest valid ones that give every SM a (tile, slice) pair;
    "one_wave": the most that keep (tile, slice) pairs within one per SM."""
    tiles = n // (ROWS_PER_WG * wgs)
    valid = [sp for sp in range(1, k // tk + 1) if valid_split(k, groups, sp, tk)] or [1]
    if fill == "one_wave":
        return max([sp for sp in valid if tiles * sp <= num_sms] or [valid[0]])
    return next((sp for sp in valid if tiles * sp >= num_sms), valid[-1])


LOADS = ("wgmma", "upcast4x", "quads", "quads_zs")


def load_order(load: str) -> str:
    """The storage order (to_rows' order) a load reads."""
    return "quads" if load.startswith("quads") else "rows"


def _widen(plgpu, ref, dtype, load: str):
    """A warpgroup's [64, 128] int4 tile in shared memory -> dtype in wgmma's register layout.
    "wgmma": loaded in that layout (Mosaic picks it: one byte per load, 32 loads a thread);
    "upcast4x": loaded as 32-bit vectors of 8 values (WGMMA_UPCAST_4X: 8 loads a thread), moved
    to wgmma's layout as int4 (16 warp shuffles + 16 byte permutes a thread), then widened. (Widening
    in the 4X layout first, 8 values per 32-bit word, does not pass Mosaic's layout inference.)
    Lowered IR per thread and 128-input step (tk 128, 16 rows): "wgmma" 32 shared loads of one byte,
    "upcast4x" 8 of four bytes; both 32 two-value widenings. "upcast4x" was slower or equal at every
    engine shape on an H200 (down 18.3 against 17.0 us: docs/benchmarks.md, fourteenth session)."""
    if load == "wgmma":
        return plgpu.layout_cast(ref[...].astype(dtype), plgpu.Layout.WGMMA)
    v = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
    return plgpu.layout_cast(plgpu.layout_cast(v, plgpu.Layout.WGMMA).astype(dtype), plgpu.Layout.WGMMA)


# per 16-bit float: the bits of 2^m + 8 (m: its mantissa bits, so 2^m's ulp is 1), that value, the PTX pair type
_ASM_PAIR = {"bfloat16": (0x4308, 136.0, "bf16x2"), "float16": (0x6408, 1032.0, "f16x2")}


def _widen_quads(plgpu, ref, dtype, zero=None, scale=None):
    """A warpgroup's [64, 128] int4 tile stored in quads() order -> dtype in wgmma's register layout,
    without shuffles: the tile is loaded in the WGMMA_UPCAST_4X layout (a thread's register (q, h):
    word l of run q of its row h, 8 values), and each word gives wgmma's registers (4q + k, h),
    k = 0..3, through one shift and, per pair, a prmt, a lop3 (the nibble into a 16-bit float's
    mantissa at 2^m: 2^m + 8 + (v - 8)) and a subtraction of 2^m + 8 (CUTLASS's widening, four
    pairs per word). With zero and scale ([64] row vectors, "quads_zs"): the subtraction takes
    2^m + 8 + (z - 8) instead and a multiplication by s follows in the same asm, so the pair comes
    out as (v - z) * s (bit-equal to the separate ops: an exact difference, one rounding).
    Per thread and 128 inputs: 8 loads of 4 bytes, 8 shifts, 32 x (prmt, lop3, sub[, mul])."""
    import jax.experimental.mosaic.gpu as mg
    from jax.experimental.mosaic.gpu import utils as mu
    from jaxlib.mlir import ir
    from jaxlib.mlir.dialects import arith, llvm

    name = jnp.dtype(dtype).name
    if name not in _ASM_PAIR:
        raise ValueError(f"int4_matmul_rows: the quads loads take bfloat16 or float16 activations, not {name}")
    magic, base, op = _ASM_PAIR[name]
    fold = zero is not None
    words = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA_UPCAST_4X)
    row = plgpu.Layout.WGMMA.reduce(1)
    args = (words,) + ((zero + jnp.asarray(base, dtype), scale) if fold else ())  # exact: 2^m + z
    types = (plgpu.Layout.WGMMA_UPCAST_4X,) + ((row, row) if fold else ())

    @plgpu.inline_mgpu(arg_types=types,
                       return_type=plgpu.ShapeDtypeStruct((ROWS_PER_WG, TK), dtype, layout=plgpu.Layout.WGMMA))
    def widen(_ctx, w, *zs):
        i16, i32 = ir.IntegerType.get_signless(16), ir.IntegerType.get_signless(32)
        pair = ir.VectorType.get((2,), mu.dtype_to_ir_type(dtype))
        src = w.registers
        out = np.empty(mg.WGMMA_LAYOUT.registers_shape((ROWS_PER_WG, TK)), dtype=object)
        if src.shape != (1, 4, 1, 1, 2, 1, 1, 1, 1) or out.shape != (1, 16, 1, 1, 2, 1, 1, 1, 1):
            raise NotImplementedError(f"_widen_quads: Mosaic GPU's register shapes changed ({src.shape}, {out.shape})")

        def dup(reg):  # vector<1 x 16-bit float> -> both halves of an i32
            v = arith.extui(i32, mu.bitcast(reg, i16))
            return arith.ori(v, arith.shli(v, arith.constant(i32, 16)))
        per_h = [[dup(r) for r in a.registers.flat] for a in zs]  # [zero + 2^m + 8, scale] x row half h
        # every input is read before any output is written (outputs may share an input's register)
        tail = "sub.{op} t{p}, t{p}, $5;\n mul.{op} t{p}, t{p}, $6;" if fold else "sub.{op} t{p}, t{p}, mg;"
        pairs = f"0x{magic:04X}{magic:04X}"
        body = "".join(f"prmt.b32 t{p}, $4, hi, 0xF{p + 4}F{p};\n lop3.b32 t{p}, t{p}, 0x000F000F, {pairs}, 0x6a;\n "
                       + tail.format(op=op, p=p) + "\n " for p in range(4))
        asm = ("{\n .reg .b32 hi, mg, t0, t1, t2, t3;\n shr.u32 hi, $4, 4;\n"
               f" mov.b32 mg, {pairs};\n {body}" + "".join(f"mov.b32 ${p}, t{p};\n " for p in range(4)) + "}")
        for q in range(4):
            for h in range(2):
                word = mu.bitcast(src[0, q, 0, 0, h, 0, 0, 0, 0], i32)
                res = llvm.inline_asm(llvm.StructType.get_literal([i32] * 4), [word] + [a[h] for a in per_h], asm,
                                      "=r,=r,=r,=r,r" + (",r,r" if fold else ""))
                for k in range(4):
                    out[0, 4 * q + k, 0, 0, h, 0, 0, 0, 0] = mu.bitcast(llvm.extractvalue(i32, res, (k,)), pair)
        return mg.FragmentedArray(_registers=out, _layout=mg.WGMMA_LAYOUT, _is_signed=None)

    return widen(*args)


def _t(plgpu, ref):
    """ref [a, b] viewed as [b, a] (newer jax: ref.transpose; older: plgpu.transpose_ref)."""
    return ref.transpose((1, 0)) if hasattr(ref, "transpose") else plgpu.transpose_ref(ref, (1, 0))


@functools.partial(jax.jit, static_argnames=("splits", "stages", "tk", "wgs", "load", "num_sms", "out_dtype"))
def int4_matmul_rows(x, wq, zs, *, splits: Optional[int] = None, stages: int = 4, tk: int = TK, wgs: int = 2,
                     load: str = "wgmma", num_sms: Optional[int] = None, out_dtype=None):
    """x [M, K] @ the 4-bit weight in `to_rows`' layout -> [M, N] in out_dtype (default x's dtype;
    float32 sums). splits: K slices (default: default_splits); stages: pipeline depth (fewer when
    the rows' buffers would not fit shared memory); tk: inputs per pipeline step (a multiple of
    128: one product per 128); wgs: consumer warpgroups (64 weight rows each); load: how a tile
    reaches wgmma's register layout (_widen; "quads" / "quads_zs": _widen_quads, wq
    stored by to_rows(order=load_order(load))); num_sms: the persistent grid. Under jit so that a
    model's many call sites of one shape share one lowering (16 calls: 3.2 s -> 0.2 s on the CPU)."""
    part = partials(x, wq, zs, splits=splits, stages=stages, tk=tk, wgs=wgs, load=load, num_sms=num_sms)
    return part.sum(0).T[:x.shape[0]].astype(out_dtype or x.dtype)  # [M, N]


def partials(x, wq, zs, *, splits: Optional[int] = None, stages: int = 4, tk: int = TK, wgs: int = 2,
             load: str = "wgmma", num_sms: Optional[int] = None):
    """The kernel alone: float32 partial sums [splits, N, M padded to a multiple of 8] (transposed)."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    m, k = x.shape
    n = wq.shape[0]
    groups = zs.shape[1]
    if load not in LOADS:
        raise ValueError(f"int4_matmul_rows: load={load!r}; one of {LOADS}")
    if wgs not in WARPGROUPS:
        raise ValueError(f"int4_matmul_rows: wgs={wgs} consumer warpgroups; supported: {WARPGROUPS} (4 hung on an "
                         f"H200 on 2026-12-02)")
    if wq.shape != (n, k) or wq.dtype != jnp.int4 or zs.shape != (2, groups, n) or not supported(m, k, n, groups, wgs):
        raise ValueError(f"int4_matmul_rows: x {x.shape}, wq {wq.shape} {wq.dtype}, zs {zs.shape} not supported "
                         f"(wq int4 [N, K]; N % {ROWS_PER_WG * wgs}, K % {TK}, groups of a multiple of {TK} inputs, "
                         f"1..{MAX_ROWS} rows)")
    if num_sms is None:
        num_sms = jax.devices()[0].core_count
    if splits is None:
        splits = default_splits(n, k, groups, num_sms, tk, wgs=wgs)
    if tk % TK or not valid_split(k, groups, splits, tk):
        raise ValueError(f"int4_matmul_rows: splits={splits} must cut K={k} into slices of whole {tk}-input steps "
                         f"(tk a multiple of {TK}) that hold whole groups of {k // groups} or lie inside one")
    mp = -(-m // 8) * 8  # wgmma's N: a multiple of 8
    xp = jnp.pad(x, ((0, mp - m), (0, 0))) if mp != m else x
    dtype = x.dtype
    g = k // groups
    ks = k // splits  # inputs per slice
    tn = ROWS_PER_WG * wgs  # weight rows per tile
    tiles = n // tn
    sub = tk // TK  # products per step, one per 128 inputs
    zg = max(tk // g, 1)  # groups per step's zero points and scales
    per_stage = tn * tk // 2 + mp * tk * jnp.dtype(dtype).itemsize + 2 * zg * tn * jnp.dtype(zs.dtype).itemsize
    stages = max(2, min(stages, SMEM_BUDGET // per_stage))  # 256 rows: 72 KiB a stage at tk 128

    spec = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM)
    # tiles of 128 inputs in shared memory, so a step's products read whole tiles
    in_specs = [spec((tn, tk), lambda kk: (0, kk), transforms=smem_transforms(plgpu, TK, jnp.int4)),
                spec((mp, tk), lambda kk: (0, kk), transforms=smem_transforms(plgpu, TK, dtype)),
                spec((2, zg, tn), lambda kk: (0, kk if g <= tk else kk // (g // tk), 0))]

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(ks // tk,), memory_registers=40, in_specs=in_specs, wg_axis="wg", num_compute_wgs=wgs,
            max_concurrent_steps=stages, compute_context=context)

    def int4_rows_kernel(w_gmem, x_gmem, zs_gmem, out_gmem):  # the name shows in profiles
        @pipeline_scope(pipeline, w_gmem, x_gmem, zs_gmem)
        def _scope(allocs, wg):
            @plgpu.nd_loop((tiles * splits,), collective_axes="sm")
            def _item(info):
                (lin,) = info.index
                tile, part = lin // splits, lin % splits
                mine = pl.ds(wg * 64, 64)  # this warpgroup's weight rows within the tile

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((64, mp), jnp.float32))
                    def _acc(acc):
                        run(acc)
                        out_gmem[part, pl.ds(tile * tn + wg * 64, 64), :] = acc[...]

                def step(_, w_s, x_s, zs_s, acc):
                    row = plgpu.Layout.WGMMA.reduce(1)
                    wide = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, (64, TK), (0,)),  # noqa: E731
                                                       plgpu.Layout.WGMMA)
                    for j in range(sub):
                        cols = pl.ds(j * TK, TK)
                        grp = j * TK // g if g < tk else 0
                        zero = plgpu.load(zs_s.at[0, grp, mine], (), layout=row)  # [64]: z - 8
                        scale = plgpu.load(zs_s.at[1, grp, mine], (), layout=row)
                        if load == "quads_zs":  # (v - z) * s from the widening itself
                            a = _widen_quads(plgpu, w_s.at[mine, cols], dtype, zero, scale)
                        else:
                            a = (_widen_quads(plgpu, w_s.at[mine, cols], dtype) if load == "quads"
                                 else _widen(plgpu, w_s.at[mine, cols], dtype, load))  # [64, TK]: v - 8, exact
                            a = (a - wide(zero)) * wide(scale)
                        plgpu.wgmma(acc, a, _t(plgpu, x_s.at[:, cols]))
                    plgpu.wgmma_wait(0)
                    return acc

                k0 = part * ks
                pipeline(step, context)(
                    w_gmem.at[pl.ds(tile * tn, tn), pl.ds(k0, ks)], x_gmem.at[:, pl.ds(k0, ks)],
                    zs_gmem.at[:, pl.ds(k0 // g, max(ks // g, 1)), pl.ds(tile * tn, tn)],
                    allocations=allocs)

    return plgpu.kernel(
        int4_rows_kernel, out_type=jax.ShapeDtypeStruct((splits, n, mp), jnp.float32), grid=(num_sms,), grid_names=("sm",),
        num_threads=wgs + 1, thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))(wq, xp, zs)
