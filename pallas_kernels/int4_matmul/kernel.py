"""x @ W with 4-bit weights for steps of few rows (decode), in Pallas (Triton lowering on NVIDIA
GPUs, interpret mode elsewhere). Contract: reference.py.

Why: XLA does not fuse the group-wise widening ((q - z) * s, a broadcast over each group of 128
input rows) into its GEMM: it writes the bf16 weight out and reads it back, so a 4-bit decode
step ran 2.4x slower than bf16 weights on an H200 (scripts/bench_int4_decode_stream.py,
2026-12-01). Here each program streams its [K/8, BN] column of packed words once and widens
them in registers.

Work split: program (j, c) computes output columns j*BN.. for the c-th of `splits` slices of K
(partial sums in float32, added outside: small N needs splits to fill the GPU). Per block of 128
input rows (16 words per column, one group when G = 128): the eight nibble planes are eight
[M, 16] x [16, BN] products on the raw values 0..15 (exact in bf16) against the activations
permuted so that plane i meets inputs 8r + i; the group's zero point and scale are applied to
the block's [M, BN] sum, not to every weight: (x . q - sum(x) z) s. M is padded to a power of
two >= 16 (the matrix units' smallest tile).
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


def _kernel(xt_ref, xs_ref, q_ref, s_ref, z_ref, o_ref, *, nk: int, per_group: int):
    # xt_ref [8, MP, KC/8] activations by nibble plane; xs_ref [MP, KC/128] float32 block sums;
    # q_ref [KC/8, BN] int32; s_ref, z_ref [KC/G, BN]; o_ref [1, MP, BN] float32
    mp, bn = o_ref.shape[1], o_ref.shape[2]
    words = BLOCK_K // 8

    def body(kb, acc):
        rows = pl.ds(pl.multiple_of(kb * words, words), words)
        w = q_ref[rows, :]  # [16, BN]
        part = jnp.zeros((mp, bn), jnp.float32)
        for i in range(8):  # plane i: inputs 8r + i, raw values 0..15 (exact in bf16)
            plane = ((w >> (4 * i)) & 0xF).astype(xt_ref.dtype)
            part += jnp.dot(xt_ref[i, :, rows], plane, preferred_element_type=jnp.float32)
        g = kb // per_group
        s = s_ref[pl.ds(g, 1), :].astype(jnp.float32)  # [1, BN]
        z = z_ref[pl.ds(g, 1), :].astype(jnp.float32)
        return acc + (part - xs_ref[:, pl.ds(kb, 1)] * z) * s

    o_ref[0] = jax.lax.fori_loop(0, nk, body, jnp.zeros((mp, bn), jnp.float32))


def supported(k: int, n: int, groups: int) -> bool:
    """Shapes the kernel takes: groups of a multiple of 128 rows, N a multiple of 32."""
    g = k // groups if groups else 0
    return groups > 0 and k % groups == 0 and g % BLOCK_K == 0 and n % 32 == 0


def default_config(k: int, n: int, groups: int) -> tuple[int, int]:
    """(bn, splits): 128-column programs (the fastest of 64 / 128 / 32 in the 32-layer stream on
    an H200), K split until there are >= 256 programs (132 SMs) while each split keeps whole
    groups."""
    bn = 128 if n % 128 == 0 else 64 if n % 64 == 0 else 32
    splits = 1
    while (n // bn) * splits < 256 and groups % (splits * 2) == 0 and (k // (splits * 2)) >= 4 * BLOCK_K:
        splits *= 2
    return bn, splits


@functools.partial(jax.jit, static_argnames=("bn", "splits", "warps", "stages", "interpret"))
def int4_matmul(x, qw, s, z, *, bn: Optional[int] = None, splits: Optional[int] = None, warps: int = 4,
                stages: int = 3, interpret: Optional[bool] = None):
    """x [M, K] (16-bit or float32) @ (qw [K/8, N] int32, s, z [K/G, N]) -> [M, N] in x's dtype."""
    m, k = x.shape
    n, groups = qw.shape[1], s.shape[0]
    if not supported(k, n, groups):
        raise ValueError(f"int4_matmul: K={k}, N={n}, {groups} groups not supported (see supported())")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    dbn, dsplits = default_config(k, n, groups)
    bn, splits = bn or dbn, splits or dsplits
    mp = max(16, 1 << (m - 1).bit_length())
    xp = jnp.zeros((mp, k), x.dtype).at[:m].set(x) if mp != m else x
    xt = xp.reshape(mp, k // 8, 8).transpose(2, 0, 1)  # [8, MP, K/8]: plane i holds inputs 8r + i
    xs = xp.astype(jnp.float32).reshape(mp, k // BLOCK_K, BLOCK_K).sum(-1)  # [MP, K/128]
    kc, gc = k // splits, groups // splits
    kw = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}
    part = pl.pallas_call(
        functools.partial(_kernel, nk=kc // BLOCK_K, per_group=(k // groups) // BLOCK_K),
        grid=(n // bn, splits),
        in_specs=[pl.BlockSpec((8, mp, kc // 8), lambda j, c: (0, 0, c)),
                  pl.BlockSpec((mp, kc // BLOCK_K), lambda j, c: (0, c)),
                  pl.BlockSpec((kc // 8, bn), lambda j, c: (c, j)),
                  pl.BlockSpec((gc, bn), lambda j, c: (c, j)),
                  pl.BlockSpec((gc, bn), lambda j, c: (c, j))],
        out_specs=pl.BlockSpec((1, mp, bn), lambda j, c: (c, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        interpret=interpret, **kw)(xt, xs, qw, s, z)
    return (part[0] if splits == 1 else part.sum(0))[:m].astype(x.dtype)
