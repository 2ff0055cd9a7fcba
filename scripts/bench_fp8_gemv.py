"""Weight-only float8 decode GEMMs on the GPU: XLA's path (`quant.linear` at <= 64 rows: the float8
weight widened inside XLA's GEMM) against a Pallas (Triton) kernel that streams the float8 weight
tiles, widens them in registers and splits K over programs, on Llama-3-8B's projection shapes.

Why: batch-1 decode with float8 weights ran 307 tok/s on an H200 (2026-12-01), i.e. ~2.5 TB/s
over the 8.0 GB read per token, where bf16 weights stream at ~3.45 TB/s; at the bf16 rate the
float8 model would decode ~420 tok/s. A GEMM of <= 64 rows is bound by the weight bytes, so the
figure to read is GB/s of weight read against the copy ceiling (scripts/bench_ceilings.py).
Not wired into the engine: one call per GEMM is dominated by the host's dispatch (~40 us), so
scripts/bench_fp8_decode_stream.py times the same kernel over 32 layers in one program, where it
ran 1.11x (1 row) and 1.23x (16 rows) slower than XLA's path on an H200 (2026-12-01): rejected.
Also tried (eleventh session): `swap` (the weight tile as the product's left operand: 1.3-1.45x
XLA's time) and `f16` (float16 products, float8 -> float16 being one conversion per pair: 1.00 /
1.08x XLA's, and XLA with float16 products 0.995x its own): neither adopted.

    python scripts/bench_fp8_gemv.py [--rows 16 64]
    python scripts/bench_fp8_gemv.py --check      # interpret mode on the CPU against XLA
"""
import argparse
import functools
import itertools
import json

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bench_fp8_gemm import pipelined  # (scripts/ is on sys.path when a script in it runs)
from jaxserve.models import quant

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}
CONFIGS = list(itertools.product((32, 64), (128, 256), (1, 2, 4), (4,), (4,)))  # bn, bk, splits, warps, stages


def _kernel(x_ref, q_ref, s_ref, o_ref, *, bk: int, nk: int, f16: bool = False):
    # x_ref [M, K / KS] (this program's K range), q_ref [BN, K / KS] float8, s_ref [BN], o_ref [1, M, BN] f32
    # f16: the products in float16 (float8 -> float16 is one instruction per pair; bf16 is not)
    m, bn = o_ref.shape[1], o_ref.shape[2]

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
        x = x_ref[:, ks]
        x = x.astype(jnp.float16) if f16 else x
        w = q_ref[:, ks].astype(x.dtype)  # widened in registers: the float8 bytes are what moves
        return acc + jnp.dot(x, w.T, preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((m, bn), jnp.float32))
    o_ref[0] = acc * s_ref[...][None, :]


def _kernel_swap(x_ref, q_ref, s_ref, o_ref, *, bk: int, nk: int):
    # the weight tile as the product's left operand (the matrix units' M side, widened in
    # registers), the step's rows as its N side: acc [BN, M]
    m, bn = o_ref.shape[1], o_ref.shape[2]

    def body(i, acc):
        ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
        x = x_ref[:, ks]
        w = q_ref[:, ks].astype(x.dtype)
        return acc + jax.lax.dot_general(w, x, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)

    acc = jax.lax.fori_loop(0, nk, body, jnp.zeros((bn, m), jnp.float32))
    o_ref[0] = (acc * s_ref[...][:, None]).T


@functools.partial(jax.jit, static_argnames=("bn", "bk", "splits", "warps", "stages", "swap", "f16", "interpret"))
def gemv(x, qw, *, bn, bk, splits, warps, stages, swap=False, f16=False, interpret=False):
    """x [M, K] (16-bit) @ {"q": [N..., K] float8, "s": [N...]} -> [M, N...]: quant.linear's weight-only
    arithmetic. M is padded to 16 rows (the matrix units' smallest tile). swap: the weight tile is
    the product's left operand (_kernel_swap); f16: float16 products (_kernel)."""
    q, s = qw["q"], qw["s"]
    out_shape = q.shape[:-1]
    q2, s2 = q.reshape(-1, q.shape[-1]), s.reshape(-1)
    m, k = x.shape
    n = q2.shape[0]
    mp = max(16, -(-m // 16) * 16)
    assert n % bn == 0 and k % (bk * splits) == 0, (n, k, bn, bk, splits)
    xp = jnp.zeros((mp, k), x.dtype).at[:m].set(x)
    kc = k // splits
    kw = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}
    part = pl.pallas_call(
        functools.partial(_kernel_swap, bk=bk, nk=kc // bk) if swap else
        functools.partial(_kernel, bk=bk, nk=kc // bk, f16=f16),
        grid=(n // bn, splits),
        in_specs=[pl.BlockSpec((mp, kc), lambda j, c: (0, c)),
                  pl.BlockSpec((bn, kc), lambda j, c: (j, c)),
                  pl.BlockSpec((bn,), lambda j, c: (j,))],
        out_specs=pl.BlockSpec((1, mp, bn), lambda j, c: (c, 0, j)),
        out_shape=jax.ShapeDtypeStruct((splits, mp, n), jnp.float32),
        interpret=interpret, **kw)(xp, q2, s2)
    return part.sum(0)[:m].astype(x.dtype).reshape((m,) + out_shape)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--check", action="store_true", help="small shapes in interpret mode against quant.linear (CPU)")
    a = ap.parse_args()
    key = jax.random.PRNGKey(0)
    if a.check:
        w = jax.random.normal(key, (512, 2, 64), jnp.float32) * 0.02  # a stacked weight, as gate_up
        qw = quant.quantize_weight(w)
        x = jax.random.normal(jax.random.fold_in(key, 1), (5, 512), jnp.float32)
        want = quant.linear(x, qw)  # 5 rows: the weight-only path
        for swap, f16 in ((False, False), (True, False), (False, True)):
            got = gemv(x, qw, bn=32, bk=64, splits=2, warps=4, stages=2, swap=swap, f16=f16, interpret=True)
            err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
            print(json.dumps({"swap": swap, "f16": f16, "check_max_rel_err": err, "shape": list(got.shape)}))
            assert got.shape == want.shape and err < (1e-3 if f16 else 1e-5)
        return
    for name, (k, n) in SHAPES.items():
        w = (jax.random.normal(jax.random.fold_in(key, k + n), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        qw = jax.jit(quant.quantize_weight)(w)
        for m in a.rows:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            ref = jax.jit(quant.linear)
            t_x = pipelined(ref, (x, qw))
            want = ref(x, qw).astype(jnp.float32)
            best = None
            for bn, bk, splits, warps, stages in CONFIGS:
                if n % bn or k % (bk * splits):
                    continue
                f = jax.jit(functools.partial(gemv, bn=bn, bk=bk, splits=splits, warps=warps, stages=stages))
                try:
                    t = pipelined(f, (x, qw))
                except Exception as e:  # a tile that does not fit
                    print(json.dumps({"proj": name, "rows": m, "config": [bn, bk, splits, warps, stages],
                                      "error": str(e).splitlines()[0][:160]}))
                    continue
                if best is None or t < best[0]:
                    err = float(jnp.max(jnp.abs(f(x, qw).astype(jnp.float32) - want)) / jnp.max(jnp.abs(want)))
                    best = (t, [bn, bk, splits, warps, stages], err)
            gb = n * k / 1e9  # float8 weight bytes read (x and the output are tiny)
            print(json.dumps({"proj": name, "rows": m, "weight_gb": gb, "xla_ms": t_x * 1e3, "xla_tb_s": gb / t_x / 1e3,
                              "pallas_ms": best[0] * 1e3, "pallas_tb_s": gb / best[0] / 1e3,
                              "pallas_over_xla": best[0] / t_x, "best_config": best[1], "max_rel_err": best[2]}),
                  flush=True)


if __name__ == "__main__":
    main()
