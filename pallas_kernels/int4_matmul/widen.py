"""4-bit words -> the 16-bit weight, for steps with too many rows for kernel.py (prefill, large
decode batches): one pass that reads the words and writes the widened weight, then XLA's GEMM
(cuBLAS) on it. Contract: reference.py.

Why: XLA's own widening (reference.int4_matmul_reference under jit) ran at ~2.6 TB/s of bytes
read + written on an H200 (a 256-row stream of Llama-3-8B's projections: 14.7 ms against bf16's
7.8), and every large 4-bit step pays it once per weight. This pass widens with the same inline
PTX as kernel.py (two words per four instructions) and writes whole [16, BN] planes.

Layout: the output [K/8, 8, N] holds plane i (nibble i of every word: inputs 8r + i) at [:, i],
(v - z) * s in the activations' dtype, rounded once (the reference's values): read as [K, N] it is
the widened weight in its own row order (each plane stored with a stride of 8 rows, so x needs no
permutation). Program (g, j): 16 words (128 inputs, inside one group) x BN columns.

Used by int4.linear for GPU steps above the kernel's MAX_ROWS (unsplit weights); `widen_rows` does the
same from mgpu.py's [N, K] layout (the Hopper default: 4-bit 128 / 128 and 1024 / 128 0.994x / 0.995x
widen's figures on an H200, fourteenth session). On an H200 a
32-layer stream of Llama-3-8B's projections took 12.3 / 29.9 ms at 256 / 1,024 rows against 14.7 /
32.4 for XLA's widening + GEMM (bf16: 7.5 / 23.6), bit-equal results (docs/benchmarks.md,
2026-12-01 twelfth session).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .kernel import _PAIR_BITS, _offset, _plane, asm_usable, column_tile, supported

ROWS = 16  # words per program: 128 inputs, which a group (a multiple of 128 inputs) never splits


def _widen_kernel(q_ref, s_ref, z_ref, o_ref, *, asm: bool):
    # q_ref [16, BN] int32; s_ref, z_ref [1, BN]; o_ref [16, 8, BN] in the output dtype
    dtype = o_ref.dtype
    convert = "offset" if jnp.dtype(dtype) in _PAIR_BITS else "magic"  # float32: 2^23 would round
    base = _offset(dtype, convert)
    w = q_ref[...]
    s = s_ref[...].astype(dtype)
    zb = z_ref[...].astype(dtype) + jnp.asarray(base, dtype)  # exact: 2^m + a zero point 0..15
    for i in range(8):
        o_ref[:, i, :] = ((_plane(w, i, dtype, convert, asm) - zb) * s).astype(dtype)


def default_config(n: int) -> dict:
    return dict(bn=column_tile(n, 256), warps=4)


def _setup(name: str, k: int, n: int, groups: int, dtype, bn, warps, asm, interpret):
    """Checks and launch options shared by widen and widen_rows -> (bn, asm, programs along K per
    group, pallas_call keywords)."""
    if not supported(k, n, groups):
        raise ValueError(f"{name}: K={k}, N={n}, {groups} groups not supported (groups of a multiple of 128 "
                         f"inputs, N a multiple of 32)")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    cfg = default_config(n)
    bn, warps = bn or cfg["bn"], warps or cfg["warps"]
    if n % bn:
        raise ValueError(f"{name}: bn={bn} must divide N={n}")
    asm = (True if asm is None else asm) and asm_usable(dtype, interpret)
    kw = {"interpret": True} if interpret else {
        "compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=1)}
    return bn, asm, k // groups // (ROWS * 8), kw


@functools.partial(jax.jit, static_argnames=("dtype", "bn", "warps", "asm", "interpret"))
def widen(qw, s, z, *, dtype, bn: Optional[int] = None, warps: Optional[int] = None, asm: Optional[bool] = None,
          interpret: Optional[bool] = None):
    """qw [K/8, N] int32, s, z [K/G, N] -> [K/8, 8, N] in dtype ([K, N] reshaped; module docstring)."""
    kw8, n = qw.shape
    bn, asm, per, kw = _setup("widen", kw8 * 8, n, s.shape[0], dtype, bn, warps, asm, interpret)
    return pl.pallas_call(
        functools.partial(_widen_kernel, asm=asm),
        grid=(kw8 // ROWS, n // bn),
        in_specs=[pl.BlockSpec((ROWS, bn), lambda g, j: (g, j)),
                  pl.BlockSpec((1, bn), lambda g, j: (g // per, j)),
                  pl.BlockSpec((1, bn), lambda g, j: (g // per, j))],
        out_specs=pl.BlockSpec((ROWS, 8, bn), lambda g, j: (g, 0, j)),
        out_shape=jax.ShapeDtypeStruct((kw8, 8, n), dtype), **kw)(qw, s, z)


def _widen_rows_kernel(q_ref, zs_ref, o_ref, *, asm: bool, quads: bool):
    # q_ref [BN, 16] int32 (words of mgpu.to_rows' [N, K] int4: nibbles hold v - 8); zs_ref [2, 1, BN]
    # (z - 8, s); o_ref [16, 8, BN]: the same output as _widen_kernel, from the transposed words.
    # quads: the words are stored in mgpu.quads' order (runs of four words byte-transposed): each
    # run's words are read with a stride of 4 and transposed back here, word k of every run at once
    dtype = o_ref.dtype
    convert = "offset" if jnp.dtype(dtype) in _PAIR_BITS else "magic"
    base = _offset(dtype, convert)
    s = zs_ref[1].astype(dtype)
    zb = zs_ref[0].astype(dtype) + jnp.asarray(base + 8, dtype)  # exact: 2^m + z
    flip = jnp.int32(-0x77777778)  # each nibble back to v
    if not quads:
        w = jnp.bitwise_xor(q_ref[...], flip).T  # [16, BN]
        for i in range(8):
            o_ref[:, i, :] = ((_plane(w, i, dtype, convert, asm) - zb) * s).astype(dtype)
        return
    stored = [q_ref[:, pl.ds(l, 4, stride=4)] for l in range(4)]  # word l of each run: [BN, 4 runs]
    for k in range(4):  # word k of each run = sum over l of (byte k of stored word l) << 8 l
        wk = sum(((st >> (8 * k)) & 0xFF) << (8 * l) for l, st in enumerate(stored))
        wk = jnp.bitwise_xor(wk, flip).T  # [4 runs, BN]: words k, k + 4, k + 8, k + 12 of the 16
        for i in range(8):
            o_ref[pl.ds(k, 4, stride=4), pl.ds(i, 1), :] = ((_plane(wk, i, dtype, convert, asm) - zb) * s).astype(
                dtype)[:, None]


@functools.partial(jax.jit, static_argnames=("bn", "warps", "asm", "interpret", "order"))
def widen_rows(wq, zs, *, bn: Optional[int] = None, warps: Optional[int] = None, asm: Optional[bool] = None,
               interpret: Optional[bool] = None, order: str = "rows"):
    """mgpu.to_rows' layout (wq [N, K] int4 holding v - 8, zs [2, K/G, N] = (z - 8, s)) -> [K/8, 8, N]
    in zs' dtype, equal to widen() of the words it came from: large steps of weights kept only in
    the Mosaic-GPU kernel's layout. Each program transposes its [BN, 16] word tile in registers.
    order: to_rows' ("quads": the runs of four words are transposed back in the program)."""
    n, k = wq.shape
    bn, asm, per, kw = _setup("widen_rows", k, n, zs.shape[1], zs.dtype, bn, warps, asm, interpret)
    words = jax.lax.bitcast_convert_type(wq.reshape(n, k // 8, 8), jnp.int32)  # [N, K/8], nibble i = input 8r + i
    return pl.pallas_call(
        functools.partial(_widen_rows_kernel, asm=asm, quads=order == "quads"),
        grid=(k // 8 // ROWS, n // bn),
        in_specs=[pl.BlockSpec((bn, ROWS), lambda g, j: (j, g)),
                  pl.BlockSpec((2, 1, bn), lambda g, j: (0, g // per, j))],
        out_specs=pl.BlockSpec((ROWS, 8, bn), lambda g, j: (g, 0, j)),
        out_shape=jax.ShapeDtypeStruct((k // 8, 8, n), zs.dtype), **kw)(words, zs)


def widen_matmul(x, qw, s, z, **kw):
    """x [M, K] @ W -> [M, N] in x's dtype: widen() then one GEMM (float32 accumulation)."""
    w = widen(qw, s, z, dtype=x.dtype, **kw).reshape(x.shape[1], qw.shape[1])
    return jnp.dot(x, w, preferred_element_type=jnp.float32).astype(x.dtype)
