"""Why a 1,024-row decode step's GEMMs run 10-20% slower than the same GEMMs alone: the device's
clock under a sustained load, or the residual-add epilogue? The engine's projections at 1,024 rows
(Llama-3-8B, the large-step compile options), 30 and 600 back to back, with the residual add, and
32 layers chained (no attention); kernel time from the profiler, the SM clock sampled by
nvidia-smi meanwhile. docs/benchmarks.md, 2026-12-01 eighth session, call 4.

    python3 scripts/bench_gemm_sustained.py
"""
import json
import subprocess
import threading
import time

import jax
import jax.numpy as jnp

from jaxserve.bench import profile as prof
from jaxserve.runner import model_runner as mr

OPTS = dict(mr._LARGE_STEP_OPTIONS)
E, F, QKV, M = 4096, 14336, 6144, 1024


def clocks(stop, out):
    """Append [SM MHz, W] samples (every 50 ms) to out until stop is set."""
    p = subprocess.Popen(["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits", "-lms", "50"],
                         stdout=subprocess.PIPE, text=True)
    while not stop.is_set():
        line = p.stdout.readline()
        if line:
            out.append([float(v) for v in line.split(",")])
    p.kill()


def run(name, f, args, iters):
    """iters calls of the compiled f under the profiler: kernel ms per call, SM clock, top kernels."""
    stop, samp = threading.Event(), []
    th = threading.Thread(target=clocks, args=(stop, samp))
    th.start()
    time.sleep(0.2)
    t0 = time.perf_counter()
    d = prof.trace_calls(f, args, iters)
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    s = prof.summarize(d, wall, top=6)
    clk = sorted(c for c, _ in samp[4:]) or [0]
    pw = sorted(p for _, p in samp[4:]) or [0]
    print(json.dumps(dict(kind="sustained", case=name, iters=iters, device_ms_per_iter=round(s["kernel_s"] * 1e3 / iters, 4),
                          sm_clock_median=clk[len(clk) // 2], sm_clock_min=clk[0], power_median=pw[len(pw) // 2],
                          top=[(k["name"][:60], k["calls"] // iters, k["mean_us"]) for k in s["top_kernels"]])), flush=True)

def chain(x, layers):
    """The step's projections over the layers (no attention, no norms)."""
    for p in layers:
        qkv = x @ p["qkv"]
        x = x + qkv[:, :E] @ p["o"]
        gu = (x @ p["gate_up"]).reshape(M, 2, F)
        x = x + (jax.nn.silu(gu[:, 0]) * gu[:, 1]) @ p["down"]
    return x


def main():
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (M, E), jnp.bfloat16)
    h = jax.random.normal(key, (M, E), jnp.bfloat16)
    xf = jax.random.normal(key, (M, F), jnp.bfloat16)
    shapes = dict(qkv=(E, QKV), o=(E, E), gate_up=(E, 2 * F), down=(F, E))
    W = {n: jax.random.normal(jax.random.fold_in(key, i), s, jnp.bfloat16) * 0.02 for i, (n, s) in enumerate(shapes.items())}
    for n, (inp, res) in dict(qkv=(x, None), o=(x, h), gate_up=(x, None), down=(xf, h)).items():
        f = jax.jit(lambda a, w: a @ w).lower(inp, W[n]).compile(compiler_options=OPTS)
        for it in (30, 600):
            run(n, f, (inp, W[n]), it)
        if res is not None:
            g = jax.jit(lambda a, w, r: r + a @ w).lower(inp, W[n], res).compile(compiler_options=OPTS)
            run(f"{n}+residual", g, (inp, W[n], res), 30)
    # 32 layers of the step's projections, distinct weights per layer (nothing stays in L2)
    layers = [{n: jax.random.normal(jax.random.fold_in(key, 100 + 4 * li + i), s, jnp.bfloat16) * 0.02
               for i, (n, s) in enumerate(shapes.items())} for li in range(32)]
    c = jax.jit(chain).lower(x, layers).compile(compiler_options=OPTS)
    run("32-layer chain", c, (x, layers), 10)
    run("32-layer chain", c, (x, layers), 40)


if __name__ == "__main__":
    main()
