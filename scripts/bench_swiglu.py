"""The MLP's gated product at Llama-3-8B shapes (E 4096, F 14336, bf16): XLA's path (the gate+up GEMM
written as [T, 2, F], then silu(gate) * up) against pallas_kernels/swiglu_matmul (one Mosaic-GPU
kernel, the gate in its epilogue), and the whole MLP (with the down projection) both ways.

Before: the elementwise pass moves 3 x T x F x 2 bytes (T = 1,024: 88 MB, ~20 us at 4.4 TB/s) next
to a 0.24 TFLOP product (~310 us at ~770 TFLOP/s), and the product writes 2 x T x F x 2 bytes the
fused kernel writes half of: fused, expect ~0.93-0.95x XLA's gate+up + gate, if the wgmma product
runs at cuBLAS' rate.

Times are the kernels' own (CUPTI, jax.experimental.mosaic.gpu.profiler), medians of --iters runs;
XLA is compiled with the engine's large-step options (Triton GEMMs off). Each line also gives the
error of both paths against the float32 reference (relative to its largest value).

    python3 scripts/bench_swiglu.py [--rows 512 1024 8192] [--configs 128:128:64:3:1 ...] [--iters 20]
"""
import argparse
import dataclasses
import json
import statistics
import sys
import traceback

import jax
import jax.numpy as jnp

sys.path.insert(0, __file__.rsplit("/scripts/", 1)[0])

from pallas_kernels.swiglu_matmul.kernel import Config, swiglu_matmul  # noqa: E402
from pallas_kernels.swiglu_matmul.reference import swiglu_matmul_reference  # noqa: E402

E, F = 4096, 14336
XLA_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def kernel_us(fn, *args, iters):
    """(output, median microseconds of the kernels fn runs)."""
    from jax.experimental.mosaic.gpu import profiler

    out, ms = profiler.measure(fn, iterations=iters)(*args)
    return out, statistics.median(ms) * 1e3


def compiled(f, *args):
    return jax.jit(f).lower(*args).compile(compiler_options=XLA_OPTIONS)


def xla_gated(x, w):
    gu = jnp.einsum("te,eaf->taf", x, w)  # [T, 2, F] in x's dtype: the engine's unfused path
    return jax.nn.silu(gu[:, 0]) * gu[:, 1]


def rel_err(a, ref):
    a, ref = a.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - ref)) / jnp.max(jnp.abs(ref)))


def parse_config(s: str) -> Config:
    tm, tf, tk, stages, minor = (int(v) for v in s.split(":"))
    return Config(tile_m=tm, tile_f=tf, tile_k=tk, stages=stages, snake_minor=minor)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[256, 512, 1024, 2048, 8192])
    ap.add_argument("--configs", nargs="+", default=["128:128:64:3:1", "128:128:64:4:1", "128:128:64:4:0"],
                    help="tile_m:tile_f:tile_k:stages:snake_minor")
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args()
    d = jax.devices()[0]
    print(json.dumps({"device": d.device_kind, "jax": jax.__version__}), flush=True)
    wd = (jax.random.normal(jax.random.key(2), (F, E), jnp.float32) * 0.02).astype(jnp.bfloat16)
    w = (jax.random.normal(jax.random.key(1), (E, 2, F), jnp.float32) * 0.02).astype(jnp.bfloat16)
    for t in args.rows:
        x = jax.random.normal(jax.random.key(t), (t, E), jnp.float32).astype(jnp.bfloat16)
        ref = swiglu_matmul_reference(x.astype(jnp.float32), w.astype(jnp.float32))
        flops = 2 * t * E * 2 * F
        row = {"rows": t}
        out, row["xla_gemm_us"] = kernel_us(compiled(lambda a, b: jnp.einsum("te,eaf->taf", a, b), x, w), x, w,
                                            iters=args.iters)
        out, row["xla_gated_us"] = kernel_us(compiled(xla_gated, x, w), x, w, iters=args.iters)
        row["xla_err"] = rel_err(out, ref)
        _, row["xla_mlp_us"] = kernel_us(compiled(lambda a, b, c: xla_gated(a, b) @ c, x, w, wd), x, w, wd,
                                         iters=args.iters)
        best = None
        for spec in args.configs:
            cfg = parse_config(spec)
            try:
                out, us = kernel_us(jax.jit(lambda a, b, cfg=cfg: swiglu_matmul(a, b, cfg=cfg)), x, w, iters=args.iters)
            except Exception as e:  # noqa: BLE001 (a configuration the device cannot take: reported, others go on)
                row.setdefault("errors", []).append(f"{spec}: {type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc(limit=2)
                continue
            row[f"fused_{spec}_us"] = us
            row[f"fused_{spec}_err"] = rel_err(out, ref)
            if best is None or us < best[1]:
                best = (cfg, us)
        if best:
            cfg = best[0]
            row["fused_best"] = dataclasses.astuple(cfg)
            row["fused_over_xla_gated"] = best[1] / row["xla_gated_us"]
            row["fused_tflops"] = flops / best[1] / 1e9
            row["xla_gemm_tflops"] = flops / row["xla_gemm_us"] / 1e9
            fused_mlp = compiled(lambda a, b, c: swiglu_matmul(a, b, cfg=cfg) @ c, x, w, wd)
            _, row["fused_mlp_us"] = kernel_us(fused_mlp, x, w, wd, iters=args.iters)
            row["fused_mlp_over_xla"] = row["fused_mlp_us"] / row["xla_mlp_us"]
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
