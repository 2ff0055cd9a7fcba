"""The 4-bit product per projection of Llama-3-8B (the engine's fused shapes), kernel time by
CUPTI: XLA's bf16 product, the engine's Triton kernel (pallas_kernels/int4_matmul/kernel.py, its
own defaults) and the Mosaic-GPU kernel (mgpu.py) over a sweep of steps (tk), pipeline depths and
K-slice policies, each timed whole (kernel + XLA's sum of the slices) and kernel alone.

    PYTHONPATH=$PWD python3 scripts/bench_int4_shapes.py [--rows 1 16 64] [--shapes qkv o gate_up down]

Bytes: 4-bit weights + zero points and scales (4 bytes per 128 weights). A decode step at batch 1
reads each once: the rate over these bytes is what batch-1 decode gets from the projection.
"""
import argparse
import functools
import json
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_swiglu import kernel_us  # noqa: E402
from jaxserve.models import int4  # noqa: E402
from pallas_kernels.int4_matmul import mgpu  # noqa: E402
from pallas_kernels.int4_matmul.kernel import int4_matmul  # noqa: E402

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # K, N
MGPU = [(256, 4, "one_wave", 2, "wgmma"), (256, 4, "one_wave", 2, "upcast4x"), (512, 3, "one_wave", 2, "wgmma"),
        (512, 3, "one_wave", 2, "upcast4x"), (256, 4, "one_wave", 3, "wgmma"), (256, 4, "one_wave", 3, "upcast4x")]
# tk, stages, K-slice policy, consumer warpgroups, load (mgpu._widen); 2026-12-02's sweep also ran
# tk 128, "cover" and 4 warpgroups (4 hung in the engine: refused now)


def configs(specs, n: int, k: int):
    """MGPU, or the --configs strings ("engine": int4.rows_config's choice for this shape)."""
    if not specs:
        return MGPU
    out = []
    for spec in specs:
        if spec.split(":")[0] == "engine":  # "engine:LOAD": the engine's choice with that load
            c = int4.rows_config((n, k), k // 128)
            out.append((c["tk"], c["stages"], "engine", c["wgs"], spec.split(":")[1] if ":" in spec else c["load"]))
        else:
            tk, stages, fill, wgs, *load = spec.split(",")  # the load is optional, as in JAXSERVE_INT4_ROWS
            out.append((int(tk), int(stages), fill, int(wgs), load[0] if load else int4.DEFAULT_LOAD))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--configs", nargs="+", default=None, metavar="TK,STAGES,FILL,WGS[,LOAD]",
                    help="mgpu options to time (default: MGPU); 'engine' = the engine's per-shape choice, "
                         "'engine:LOAD' the same with that load (mgpu.LOADS)")
    a = ap.parse_args()
    us = functools.partial(kernel_us, iters=a.iters)
    sms = jax.devices()[0].core_count
    for name in a.shapes:
        k, n = SHAPES[name]
        w = (jax.random.normal(jax.random.key(1), (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        q = jax.jit(int4.quantize)(w)
        stored = {o: jax.jit(mgpu.to_rows, static_argnames="order")(q["qw"], q["s"], q["z"], order=o)
                  for o in {mgpu.load_order(c[4]) for c in configs(a.configs, n, k)}}  # (wq, zs) per order used
        mb = (k * n / 2 + 4 * k * n / 128) / 1e6
        for m in a.rows:
            x = jax.random.normal(jax.random.key(m), (m, k), jnp.bfloat16)
            want, t_bf = us(jax.jit(lambda x, w: x @ w), x, w)
            ref, t_tri = us(jax.jit(lambda x, q: int4_matmul(x, q["qw"], q["s"], q["z"])), x, q)
            row = {"shape": name, "rows": m, "bf16_us": round(t_bf, 1), "triton_us": round(t_tri, 1),
                   "triton_tb_s": round(mb / t_tri, 2)}
            best = None
            for tk, stages, fill, wgs, load in configs(a.configs, n, k):
                if not mgpu.supported(m, k, n, k // 128, wgs):  # 3 warpgroups: N a multiple of 192
                    continue
                sp = (int4.rows_config((n, k), k // 128)["splits"] if fill == "engine"
                      else mgpu.default_splits(n, k, k // 128, sms, tk, fill, wgs))
                cfg = dict(splits=sp, stages=stages, tk=tk, wgs=wgs, load=load)
                wq, zs = stored[mgpu.load_order(load)]
                try:
                    got, t = us(jax.jit(functools.partial(mgpu.int4_matmul_rows, **cfg)), x, wq, zs)
                    _, t_k = us(jax.jit(functools.partial(mgpu.partials, **cfg)), x, wq, zs)
                except Exception as e:  # noqa: BLE001 (report and go on)
                    print(json.dumps({"shape": name, "rows": m, "tk": tk, "wgs": wgs, "error": str(e)[:300]}), flush=True)
                    continue
                err = float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref.astype(jnp.float32)))
                            / jnp.max(jnp.abs(ref.astype(jnp.float32))))
                r = {"tk": tk, "stages": stages, "fill": fill, "wgs": wgs, "load": load, "splits": sp, "us": round(t, 1),
                     "kernel_us": round(t_k, 1), "tb_s": round(mb / t, 2), "err_vs_triton": round(err, 4)}
                print(json.dumps({"shape": name, "rows": m, **r}), flush=True)
                if best is None or t < best["us"]:
                    best = r
            row["mgpu_best"] = best
            row["best_over_triton"] = round(best["us"] / t_tri, 3) if best else None
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
