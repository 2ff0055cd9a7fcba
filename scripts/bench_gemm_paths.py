"""The engine's bf16 GEMM shapes (Llama-3-8B) through XLA's GEMM paths and through PyTorch on the
same device, in one run: is XLA's GEMM rate (~650-700 TFLOP/s in the engine's profiles) what the
device gives, or do PyTorch's cuBLAS choices (~790 TFLOP/s on 8192^3 here, KINDS.md) leave a gap?

  xla            the engine's compile options for steps of more than 256 tokens (Triton GEMMs off)
  xla_triton     XLA's defaults (its Triton GEMM emitter autotuned against cuBLAS)
  xla_lt         Triton off and cuBLASLt (xla_gpu_enable_cublaslt)
  xla_tn         Triton off, the weight stored [out, in] (x @ w.T: the "TN" GEMM; cuBLAS's choice of
                 kernel depends on the layouts, and a layout is free to pick when loading)
  torch          torch.matmul, timed the same way (pipelined, one sync at the end)

Prints one JSON line per (shape, path): ms and TFLOP/s, pipelined (calls dispatched back to back,
one wait at the end), and device_ms / device_tflop_per_s: the kernels' own time, from the JAX
profiler for XLA and a replayed CUDA graph for torch. Below ~50 us per call the pipelined figure is
the host's dispatch rate, not the GEMM's (2026-12-01, eighth session): read device_* there.

    python3 scripts/bench_gemm_paths.py [--rows 1024 8192] [--shapes o qkv] [--paths xla xla_tn] [--no-torch]
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp

from bench_fp8_gemm import pipelined  # (scripts/ is on sys.path when a script in it runs)

E, F, V, QKV = 4096, 14336, 128256, 6144
SHAPES = {"qkv": (E, QKV), "o": (E, E), "gate_up": (E, 2 * F), "down": (F, E), "square": (8192, 8192)}
PATHS = {"xla": {"xla_gpu_enable_triton_gemm": False}, "xla_triton": {},
         "xla_lt": {"xla_gpu_enable_triton_gemm": False, "xla_gpu_enable_cublaslt": True},
         "xla_tn": {"xla_gpu_enable_triton_gemm": False}}


def torch_time(m, k, n, iters=30):
    """(pipelined s, device s) per torch.matmul; device: iters products captured in a CUDA graph,
    replayed and timed with events."""
    import torch

    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(k, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        torch.matmul(a, b)
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / iters
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        torch.matmul(a, b)  # cuBLAS workspace and handle made outside the capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(iters):
            torch.matmul(a, b)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    g.replay()
    end.record()
    torch.cuda.synchronize()
    return wall, start.elapsed_time(end) / 1e3 / iters


def device_time(f, args, iters=30):
    """Seconds of kernel time per call of the compiled f (every kernel it runs), from the profiler."""
    from jaxserve.bench.profile import op_times, trace_calls

    return sum(ns for ns, _ in op_times(trace_calls(f, args, iters)).values()) / 1e9 / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[1024, 8192])
    ap.add_argument("--no-torch", action="store_true")
    ap.add_argument("--paths", nargs="+", default=list(PATHS))
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    a = ap.parse_args()
    key = jax.random.PRNGKey(0)
    for name in a.shapes:
        k, n = SHAPES[name]
        w = jax.random.normal(key, (k, n), jnp.bfloat16)
        for m in ([8192] if name == "square" else a.rows):
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            flops = 2 * m * k * n
            times = {}
            for p in a.paths:
                try:
                    if p == "xla_tn":  # [N, K] weight, contracted on its last axis
                        wt = jnp.asarray(w.T)
                        f = jax.jit(lambda x, wt: jax.lax.dot_general(x, wt, (((1,), (1,)), ((), ())))).lower(
                            x, wt).compile(compiler_options=PATHS[p])
                        times[p] = (pipelined(f, (x, wt)), device_time(f, (x, wt)))
                        del wt
                        continue
                    f = jax.jit(lambda x, w: x @ w).lower(x, w).compile(compiler_options=PATHS[p])
                    times[p] = (pipelined(f, (x, w)), device_time(f, (x, w)))
                except Exception as e:  # an option this jaxlib does not know: say so, go on
                    print(json.dumps(dict(kind="gemm_path", shape=name, rows=m, path=p, error=str(e)[:200])), flush=True)
            if not a.no_torch:
                times["torch"] = torch_time(m, k, n)
            for p, (t, dev) in times.items():
                print(json.dumps(dict(kind="gemm_path", shape=name, rows=m, k=k, n=n, path=p, ms=t * 1e3,
                                      tflop_per_s=flops / t / 1e12, device_ms=dev * 1e3,
                                      device_tflop_per_s=flops / dev / 1e12 if dev else None)), flush=True)
            del x


if __name__ == "__main__":
    main()
