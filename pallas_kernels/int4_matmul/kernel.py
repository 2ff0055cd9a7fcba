"""x @ W with 4-bit weights for steps of few rows (decode), in Pallas (Triton lowering on NVIDIA
GPUs, interpret mode elsewhere). Contract: reference.py.

Why: XLA does not fuse the group-wise widening ((q - z) * s, a broadcast over each group of 128
input rows) into its GEMM: it writes the bf16 weight out and reads it back, so a 4-bit decode
step ran 2.4-2.8x slower than bf16 weights on an H200 (scripts/bench_int4_decode_stream.py,
docs/benchmarks.md 2026-12-01, tenth session). Here each program streams its [K/8, BN] column of
packed words once and widens them in registers.

Work split: program (j, c) computes output columns j*BN.. for the c-th of `splits` slices of K
(partial sums in float32, added outside: small N needs splits to fill the GPU). Per block of 128
input rows (16 words per column, one group when G = 128), either layout:
  planes  eight [M, 16] x [16, BN] products, plane i = nibble i of every word (inputs 8r + i),
          against the activations permuted to match outside (strided loads of every 8th input
          inside the kernel ran the engine's batch-1 decode 12% slower);
  rows    each word repeated for its eight rows and shifted per row: one [M, 128] x [128, BN].
The values are widened without an integer-to-float conversion (quarter rate): the bits of 2^m + v
in the float format, minus 2^m ("magic"), or with 2^m left in and added to the zero point
("offset"). The group's zero point and scale are applied to the block's [M, BN] sum, not to every
weight: (x . q - sum(x) z) s. M is padded to a power of two >= 16 (the matrix units' tile).
With 16-bit activations on a GPU the plane layout widens two words per four instructions of inline
PTX (`asm`: two shifts and two three-input logic ops put nibble i of two neighbouring words into
one register as a pair of 16-bit floats), where Triton's own code for the same jnp ops spends
about twice the instructions on a word each (the widening, not the bytes, bounds this kernel).

Measured (H200, 32 layers of Llama-3-8B's projections, docs/benchmarks.md 2026-12-01 tenth and
eleventh sessions): at 16 rows 3.64 ms with `asm` and 256-column programs against 4.41 without
(bf16 weights: 3.95; XLA's widening: 11.2), at 32 rows 4.70 against 5.28 (bf16 4.14), 5.25 at
64 (bf16 4.45): the 4-bit weights stream at ~1 TB/s. A kernel at the copy rate (~1.2 ms) needs
the products' operands laid out in registers as the matrix units read them (Marlin's layout),
which Triton does not expose; the weights as the products' left operand (Hopper's register
operand) ran 1.1-1.25x slower (left open).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

BLOCK_K = 128  # input rows per loop iteration (16 int32 words per column)
MAX_ROWS = 64  # the kernel's M tile is the whole (padded) step; beyond this the runner uses XLA


# 4-bit value v -> float without an integer-to-float conversion (a quarter-rate instruction):
# the bits of (2^m + v) in the float format, as an integer of its width, minus 2^m (exact).
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0, jnp.int16), jnp.dtype(jnp.float16): (0x6400, 1024.0, jnp.int16),
          jnp.dtype(jnp.float32): (0x4B000000, 8388608.0, jnp.int32)}


def _to_float(v, dtype, convert: str):
    """int32 values 0..15 -> dtype: v ("magic") or base + v ("offset": the caller adds base to the
    zero point instead of subtracting it from every weight)."""
    bits, base, itype = _MAGIC[jnp.dtype(dtype)]
    f = jax.lax.bitcast_convert_type((v | bits).astype(itype), dtype)
    return f if convert == "offset" else f - jnp.asarray(base, dtype)


def _offset(dtype, convert: str) -> float:
    return _MAGIC[jnp.dtype(dtype)][1] if convert == "offset" else 0.0


# a pair of 16-bit floats 2^m + 0 (bf16 128.0, fp16 1024.0) in one 32-bit register
_PAIR_BITS = {jnp.dtype(jnp.bfloat16): 0x43004300, jnp.dtype(jnp.float16): 0x64006400}


def plane_asm_code(i: int, dtype) -> str:
    """PTX for one instance of the paired widening: inputs $1, $2 (two int32 words), output $0 (two
    16-bit floats): low half 2^m + nibble i of $1, high half 2^m + nibble i of $2. lop3 with table
    0xEA (234) is (a & b) | c."""
    lo = f"shr.u32 a, $1, {4 * i}; " if i else "mov.b32 a, $1; "
    d = 16 - 4 * i  # nibble i of the second word moves to bits 16..19
    hi = f"shl.b32 b, $2, {d}; " if d > 0 else f"shr.u32 b, $2, {-d}; " if d < 0 else "mov.b32 b, $2; "
    return (f"{{ .reg .b32 a, b, c; {lo}{hi}lop3.b32 c, a, {0xF}, {_PAIR_BITS[jnp.dtype(dtype)]}, 234; "
            f"lop3.b32 $0, b, {0xF0000}, c, 234; }}")


def asm_usable(dtype, interpret: bool) -> bool:
    """The inline-PTX widening runs compiled (not in interpret mode) and for 16-bit dtypes."""
    return not interpret and jnp.dtype(dtype) in _PAIR_BITS


def column_tile(n: int, widest: int) -> int:
    """The widest of 256 / 128 / 64 / 32 columns that is at most `widest` and divides N."""
    return next(b for b in (256, 128, 64, 32) if b <= widest and n % b == 0)


def _plane(w, i: int, dtype, convert: str, asm: bool):
    """Plane i (nibble i of every word) of w [R, C] int32 as dtype values; asm: the inline-PTX
    widening, two words per instance (pack=2), the same values as the jnp ops."""
    if not asm:
        return _to_float((w >> (4 * i)) & 0xF, dtype, convert)
    [f] = pltriton.elementwise_inline_asm(plane_asm_code(i, dtype), args=[w], constraints="=r,r,r", pack=2,
                                          result_shape_dtypes=[jax.ShapeDtypeStruct(w.shape, dtype)])
    return f if convert == "offset" else f - jnp.asarray(_MAGIC[jnp.dtype(dtype)][1], dtype)


def _kernel(x_ref, q_ref, s_ref, z_ref, o_ref, *, nk: int, per_group: int, convert: str, layout: str, asm: bool):
    # x_ref: planes [8, MP, KC/8] (the activations by nibble plane), rows [MP, KC]; q_ref [KC/8, BN]
    # int32; s_ref, z_ref [KC/G, BN]; o_ref [1, MP, BN] (float32 partial sums when K is split,
    # else the output dtype)
    mp, bn = o_ref.shape[1], o_ref.shape[2]
    words = BLOCK_K // 8
    base = _offset(x_ref.dtype, convert)

    def body(kb, acc):
        w = q_ref[pl.ds(pl.multiple_of(kb * words, words), words), :]  # [16, BN]
        if layout == "planes":  # plane i: nibble i of every word, inputs 8r + i
            rows = pl.ds(pl.multiple_of(kb * words, words), words)
            part = jnp.zeros((mp, bn), jnp.float32)
            xs = jnp.zeros((mp, 1), jnp.float32)
            for i in range(8):
                x = x_ref[i, :, rows]  # [MP, 16]
                part += jnp.dot(x, _plane(w, i, x.dtype, convert, asm), preferred_element_type=jnp.float32)
                xs += jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
        else:  # rows: each word repeated for its eight rows, row r shifted by 4 (r % 8)
            shifts = (jnp.arange(BLOCK_K, dtype=jnp.int32) % 8 * 4)[:, None]
            rep = jnp.broadcast_to(w[:, None, :], (words, 8, bn)).reshape(BLOCK_K, bn)
            x = x_ref[:, pl.ds(pl.multiple_of(kb * BLOCK_K, BLOCK_K), BLOCK_K)]  # [MP, 128]
            part = jnp.dot(x, _to_float((rep >> shifts) & 0xF, x.dtype, convert), preferred_element_type=jnp.float32)
            xs = jnp.sum(x.astype(jnp.float32), axis=1, keepdims=True)
        g = kb // per_group
        s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, BN]
        z = z_ref[pl.ds(g, 1), :].astype(jnp.float32) + base
        return acc + (part - xs * z) * s

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((mp, bn), jnp.float32))
    o_ref[0] = acc.astype(o_ref.dtype)


def supported(k: int, n: int, groups: int) -> bool:
    """Shapes the kernel takes: groups of a multiple of 128 rows, N a multiple of 32."""
    g = k // groups if groups else 0
    return groups > 0 and k % groups == 0 and g % BLOCK_K == 0 and n % 32 == 0


def default_config(m: int, k: int, n: int, groups: int) -> dict:
    """The fastest configuration measured per padded row count in the 32-layer Llama-3-8B stream
    on an H200 (scripts/bench_int4_decode_stream.py, docs/benchmarks.md 2026-12-01 tenth and
    eleventh sessions): the plane layout widened by inline PTX up to 32 rows (256-column
    programs at 16 rows, 128 with 2 warps at 32) and the row layout at 64; K split until N x
    splits >= 32,768 (256 programs of 128 columns on 132 SMs) while each split keeps whole groups
    and at least 512 inputs."""
    mp = max(16, 1 << (m - 1).bit_length())
    bn = column_tile(n, 256 if mp <= 16 else 128)
    splits = 1
    while n * splits < 256 * 128 and groups % (splits * 2) == 0 and (k // (splits * 2)) >= 4 * BLOCK_K:
        splits *= 2
    if mp <= 16:
        return dict(bn=bn, splits=splits, warps=4, stages=3, convert="offset", layout="planes", asm=True)
    if mp <= 32:
        return dict(bn=bn, splits=splits, warps=2, stages=3, convert="offset", layout="planes", asm=True)
    return dict(bn=bn, splits=splits, warps=4, stages=3, convert="offset", layout="rows", asm=False)


@functools.partial(jax.jit, static_argnames=("bn", "splits", "warps", "stages", "convert", "layout", "asm",
                                             "interpret"))
def int4_matmul(x, qw, s, z, *, bn: Optional[int] = None, splits: Optional[int] = None, warps: Optional[int] = None,
                stages: Optional[int] = None, convert: Optional[str] = None, layout: Optional[str] = None,
                asm: Optional[bool] = None, interpret: Optional[bool] = None):
    """x [M, K] (16-bit or float32) @ (qw [K/8, N] int32, s, z [K/G, N]) -> [M, N] in x's dtype.
    Options left None come from default_config (convert: "magic" | "offset"; layout: "planes" |
    "rows"; asm: the plane layout's inline-PTX widening, used only compiled and with 16-bit x)."""
    m, k = x.shape
    n, groups = qw.shape[1], s.shape[0]
    if not supported(k, n, groups):
        raise ValueError(f"int4_matmul: K={k}, N={n}, {groups} groups not supported (see supported())")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    cfg = default_config(m, k, n, groups)
    bn, splits, warps, stages = bn or cfg["bn"], splits or cfg["splits"], warps or cfg["warps"], stages or cfg["stages"]
    convert, layout = convert or cfg["convert"], layout or cfg["layout"]
    asm = (cfg["asm"] if asm is None else asm) and layout == "planes" and asm_usable(x.dtype, interpret)
    if n % bn or groups % splits:
        raise ValueError(f"int4_matmul: bn={bn} must divide N={n} and splits={splits} the {groups} groups")
    if convert == "offset" and jnp.dtype(x.dtype).itemsize > 2:
        convert = "magic"  # float32: base 2^23 would cancel away the products' low bits
    mp = max(16, 1 << (m - 1).bit_length())
    xp = jnp.zeros((mp, k), x.dtype).at[:m].set(x) if mp != m else x
    kc, gc = k // splits, groups // splits
    kw = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}
    out_dtype = x.dtype if splits == 1 else jnp.float32
    if layout == "planes":
        xa = xp.reshape(mp, k // 8, 8).transpose(2, 0, 1)  # [8, MP, K/8]: plane i holds inputs 8r + i
        x_spec = pl.BlockSpec((8, mp, kc // 8), lambda j, c: (0, 0, c))
    else:
        xa, x_spec = xp, pl.BlockSpec((mp, kc), lambda j, c: (0, c))
    part = pl.pallas_call(
        functools.partial(_kernel, nk=kc // BLOCK_K, per_group=(k // groups) // BLOCK_K, convert=convert,
                          layout=layout, asm=asm),
        grid=(n // bn, splits),
        in_specs=[x_spec,
                  pl.BlockSpec((kc // 8, bn), lambda j, c: (c, j)),
                  pl.BlockSpec((gc, bn), lambda j, c: (c, j)),
                  pl.BlockSpec((gc, bn), lambda j, c: (c, j))],
        out_specs=pl.BlockSpec((1, mp, bn), lambda j, c: (c, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), out_dtype),
        name="int4_matmul",  # the name profiles show
        interpret=interpret, **kw)(xa, qw, s, z)
    out = part[0] if splits == 1 else part.sum(0).astype(x.dtype)
    return out if mp == m else out[:m]
