"""The MLP's elementwise pass on the GPU: is silu(gate) x up worth fusing into a GEMM?

Today the MLP is gate_up = h @ w_gate_up (cuBLAS, [T, 2F] written), then silu(gate) x up (an XLA
loop fusion: [T, 2F] read, [T, F] written), then @ w_down. The fusion moves 3 x T x F x 2 bytes
(~0.21 ms at 8,192 rows on ~3.3 TB/s) beside ~3 ms of GEMM, so a fused kernel pays only if its
GEMM runs within ~7% of cuBLAS. This times, on Llama-3-8B's shapes (E 4096, F 14336):

  xla        the model's path as compiled by default (cuBLAS GEMM + loop fusion)
  triton_any the same with XLA's Triton GEMM emitter allowed everywhere (it can fuse the
             elementwise ops into a GEMM it autotunes against cuBLAS)
  triton_off every GEMM a cuBLAS call (the engine's large steps since 2026-12-01), and the MLP
             in 1,024 / 2,048-row chunks (a scan) so that the gate_up output may stay in L2
  pallas     a Pallas (Triton) kernel computing silu(h @ Wg) x (h @ Wu) per output tile, for a
             few tile shapes

each as the gate_up half alone and as the whole MLP, pipelined (the time inside a jitted step).

    python scripts/bench_mlp_fusion.py [--rows 256 1024 8192] [--check]
"""
import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bench_fp8_gemm import pipelined  # (scripts/ is on sys.path when a script in it runs)

E, F = 4096, 14336
TRITON_OFF = {"xla_gpu_enable_triton_gemm": False}  # the engine's setting for steps over 256 tokens
CONFIGS = [  # (block rows, block cols per half, K tile, warps, stages)
    (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
    (128, 128, 32, 8, 4), (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]


def _kernel(x_ref, wg_ref, wu_ref, o_ref, *, bk: int, nk: int):
    # x_ref [BM, E]; wg_ref, wu_ref [E, BN] (gate / up columns of the same output tile); o_ref [BM, BN]
    bm, bn = o_ref.shape

    def body(i, acc):
        ag, au = acc
        ks = pl.ds(pl.multiple_of(i * bk, bk), bk)
        x = x_ref[:, ks]
        ag = ag + jnp.dot(x, wg_ref[ks, :], preferred_element_type=jnp.float32)
        au = au + jnp.dot(x, wu_ref[ks, :], preferred_element_type=jnp.float32)
        return ag, au

    z = jnp.zeros((bm, bn), jnp.float32)
    ag, au = jax.lax.fori_loop(0, nk, body, (z, z))
    o_ref[...] = (ag * jax.nn.sigmoid(ag) * au).astype(o_ref.dtype)


def fused_gate_up(h, w_gate_up, *, bm, bn, bk, warps, stages, interpret=False):
    """silu(h @ w_gate_up[:, 0]) * (h @ w_gate_up[:, 1]); h [T, E], w_gate_up [E, 2, F] -> [T, F]."""
    t, e = h.shape
    f = w_gate_up.shape[-1]
    assert t % bm == 0 and f % bn == 0 and e % bk == 0, (t, f, e, bm, bn, bk)
    w2 = w_gate_up.reshape(e, 2 * f)  # gate columns [0, F), up columns [F, 2F): a free view
    nf = f // bn
    kw = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=warps, num_stages=stages)}
    return pl.pallas_call(
        lambda *r: _kernel(*r, bk=bk, nk=e // bk),
        grid=(t // bm, nf),
        in_specs=[pl.BlockSpec((bm, e), lambda i, j: (i, 0)),
                  pl.BlockSpec((e, bn), lambda i, j: (0, j)),
                  pl.BlockSpec((e, bn), lambda i, j: (0, j + nf))],
        out_specs=pl.BlockSpec((bm, bn), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((t, f), h.dtype),
        interpret=interpret, **kw)(h, w2, w2)


def chunked_mlp(h, w_gate_up, w_down, *, rows: int):
    """The MLP over row chunks in a loop (a scan, so XLA cannot merge the chunks' GEMMs back):
    a chunk's [rows, 2F] gate_up output (1,024 rows: 59 MB) may still sit in the 50 MB L2 when
    the elementwise pass reads it."""
    t, e = h.shape
    _, out = jax.lax.scan(lambda c, x: (c, xla_gate_up(x, w_gate_up) @ w_down), None, h.reshape(t // rows, rows, e))
    return out.reshape(t, -1)


def xla_gate_up(h, w_gate_up):
    gu = jnp.einsum("tk,k...->t...", h, w_gate_up)
    return jax.nn.silu(gu[:, 0]) * gu[:, 1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 1024, 8192])
    ap.add_argument("--check", action="store_true", help="small shapes in interpret mode against XLA (CPU)")
    a = ap.parse_args()
    if a.check:
        k1, k2 = jax.random.split(jax.random.PRNGKey(0))
        h = jax.random.normal(k1, (64, 256), jnp.float32)
        w = jax.random.normal(k2, (256, 2, 128), jnp.float32) * 0.05
        got = fused_gate_up(h, w, bm=32, bn=64, bk=64, warps=4, stages=2, interpret=True)
        err = float(jnp.max(jnp.abs(got - xla_gate_up(h, w))))
        print(json.dumps({"check_max_abs_err": err}))
        assert err < 1e-3
        return
    key = jax.random.PRNGKey(0)
    k1, k2, k3 = jax.random.split(key, 3)
    w_gu = (jax.random.normal(k1, (E, 2, F), jnp.float32) * 0.02).astype(jnp.bfloat16)
    w_d = (jax.random.normal(k2, (F, E), jnp.float32) * 0.02).astype(jnp.bfloat16)
    triton_any = {"xla_gpu_triton_gemm_any": True}
    for m in a.rows:
        h = jax.random.normal(k3, (m, E), jnp.float32).astype(jnp.bfloat16)
        flop_gu = 2 * m * E * 2 * F
        flop_mlp = flop_gu + 2 * m * F * E
        ref = jax.jit(xla_gate_up)(h, w_gu)
        rows = []

        def rec(name, fn, args, flop, opts=None):
            t0 = time.perf_counter()
            c = jax.jit(fn).lower(*args).compile(compiler_options=opts)
            ct = time.perf_counter() - t0
            dt = pipelined(c, args)
            rows.append({"rows": m, "variant": name, "ms": round(dt * 1e3, 4),
                         "tflops": round(flop / dt / 1e12, 1), "compile_s": round(ct, 2)})
            return c

        rec("xla gate_up+silu", xla_gate_up, (h, w_gu), flop_gu)
        rec("xla gemm only", lambda h, w: jnp.einsum("tk,k...->t...", h, w), (h, w_gu), flop_gu)
        rec("triton_any gate_up+silu", xla_gate_up, (h, w_gu), flop_gu, triton_any)
        mlp = lambda h, wg, wd: xla_gate_up(h, wg) @ wd  # noqa: E731
        rec("xla mlp", mlp, (h, w_gu, w_d), flop_mlp)
        rec("triton_any mlp", mlp, (h, w_gu, w_d), flop_mlp, triton_any)
        rec("triton_off mlp", mlp, (h, w_gu, w_d), flop_mlp, TRITON_OFF)
        for c in (1024, 2048):
            if m > c and m % c == 0:
                rec(f"triton_off mlp in {c}-row chunks", functools.partial(chunked_mlp, rows=c), (h, w_gu, w_d),
                    flop_mlp, TRITON_OFF)
        best = None
        for bm, bn, bk, warps, stages in CONFIGS:
            if m % bm:
                continue
            name = f"pallas {bm}x{bn}x{bk} w{warps} s{stages}"
            fn = lambda h, w, c=(bm, bn, bk, warps, stages): fused_gate_up(  # noqa: E731
                h, w, bm=c[0], bn=c[1], bk=c[2], warps=c[3], stages=c[4])
            try:
                c = rec(name, fn, (h, w_gu), flop_gu)
                err = float(jnp.max(jnp.abs(c(h, w_gu).astype(jnp.float32) - ref.astype(jnp.float32))))
                rows[-1]["max_abs_err"] = err
                if best is None or rows[-1]["ms"] < best[1]:
                    best = (fn, rows[-1]["ms"])
            except Exception as e:  # a tile that does not fit shared memory or registers
                rows.append({"rows": m, "variant": name, "error": str(e).splitlines()[0][:160]})
        if best is not None:
            rec("pallas(best) mlp", lambda h, wg, wd: best[0](h, wg) @ wd, (h, w_gu, w_d), flop_mlp)
        for r in rows:
            print(json.dumps(r), flush=True)


if __name__ == "__main__":
    main()
