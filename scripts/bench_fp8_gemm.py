"""Float8 weights on the GPU: time `quant.linear` (per-token activation quantization, float8 GEMM,
scales; at most quant.WEIGHT_ONLY_MAX_ROWS rows: bf16 activations times the widened weight)
against the bf16 matmul it replaces, on Llama-3-8B's projection shapes at a decode batch
and a prefill step, pipelined (the time inside a jitted step), and report what XLA made of it
(whether the GEMM is a float8 cuBLAS call, and any transpose of the weight per call).

    python scripts/bench_fp8_gemm.py [--rows 1 64 128 256 8192]   (both float8 paths at every size)
"""
import argparse
import functools
import json
import re
import time

import jax
import jax.numpy as jnp

from jaxserve.models import quant

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}


def pipelined(f, args, iters=50):
    jax.block_until_ready(f(*args))
    t0 = time.perf_counter()
    for _ in range(iters):
        out = f(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 128, 256, 8192])
    a = ap.parse_args()
    key = jax.random.PRNGKey(0)
    for name, (k, n) in SHAPES.items():
        w = (jax.random.normal(key, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
        qw = jax.jit(quant.quantize_weight)(w)
        f_bf16 = jax.jit(lambda x, w: x @ w)
        for m in a.rows:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            t_b = pipelined(f_bf16, (x, w))
            ref = (x.astype(jnp.float32) @ w.astype(jnp.float32))
            flops = 2 * m * k * n
            # both float8 paths at every size (the engine picks by rows: quant.WEIGHT_ONLY_MAX_ROWS)
            for path, wo in (("weight_only", True), ("fp8_x_fp8", False)):
                f_fp8 = jax.jit(functools.partial(quant.linear, weight_only=wo))
                hlo = f_fp8.lower(x, qw).compile().as_text()
                calls = sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo)))
                t_q = pipelined(f_fp8, (x, qw))
                err = float(jnp.linalg.norm(f_fp8(x, qw).astype(jnp.float32) - ref) / jnp.linalg.norm(ref))
                print(json.dumps(dict(kind="fp8_gemm", proj=name, rows=m, path=path,
                                      engine_path=(m <= quant.WEIGHT_ONLY_MAX_ROWS) == wo, k=k, n=n,
                                      bf16_ms=t_b * 1e3, fp8_ms=t_q * 1e3, fp8_over_bf16=t_q / t_b,
                                      bf16_tflops=flops / t_b / 1e12, fp8_tflops=flops / t_q / 1e12,
                                      weight_tb_s=n * k / t_q / 1e12, rel_err=err, custom_calls=calls,
                                      transposes=hlo.count(" transpose("),
                                      fusions=hlo.count(" fusion(") + hlo.count("fusion."))), flush=True)

if __name__ == "__main__":
    main()
