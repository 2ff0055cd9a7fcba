"""Probe for a next 4-bit decode kernel: can Mosaic GPU (Pallas' wgmma + TMA backend) take 4-bit
weights as wgmma's register operand, and how fast does the weight stream then run?

    out^T [N, M] = W [N, K] (jnp.int4 in memory, K innermost; widened to bf16 in registers,
                   optionally v * s + b per group of 128 inputs) @ x^T [K, M] (shared memory)

Two consumer warpgroups own 64 rows of N each (wgmma's M); x's M rows are wgmma's N (8..256), so
decode-sized steps waste no products. Against, in the same process: XLA's bf16 product and
pallas_kernels/int4_matmul's Triton kernel (words [K/8, N], scales and zeros) at Llama-3-8B's
gate+up shape (K 4096, N 28672; 58.7 MB of 4-bit weights). Kernel time by CUPTI.

Not the engine's kernel: no split-K (narrow outputs such as o and down would fill 32 of 132 SMs),
a storage order ([N, K] int4, signed) the engine does not use. On an H200 (docs/benchmarks.md,
2026-12-01 twelfth session, calls 5-6) the scaled form took 0.80x / 0.63x / 0.56x the Triton
kernel's time at 16 / 32 / 64 rows.

    python3 scripts/bench_int4_mgpu_probe.py [--rows 16 32 64]
    python3 scripts/bench_int4_mgpu_probe.py --lower   # trace and lower for CUDA only (no GPU needed)
"""
import argparse
import functools
import os
import sys

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from bench_swiglu import kernel_us  # noqa: E402 (scripts/ is on sys.path when a script in it runs)
from pallas_kernels.mosaic_common import smem_transforms  # noqa: E402

K, N, G = 4096, 28672, 128


def _t(plgpu, ref):
    """ref [a, b] viewed as [b, a] (newer jax: ref.transpose; older: plgpu.transpose_ref)."""
    return ref.transpose((1, 0)) if hasattr(ref, "transpose") else plgpu.transpose_ref(ref, (1, 0))


def mixed(wq, x, sb=None, *, tk=128, stages=4, num_sms=132):
    """wq [N, K] int4, x [M, K] bf16, sb None or [2, K/G, N] bf16 (scale, offset per group of G
    inputs; tk must be G) -> out^T [N, M] float32."""
    import jax.experimental.pallas.mosaic_gpu as plgpu

    n, k = wq.shape
    m = x.shape[0]
    tn = 128  # two consumer warpgroups x 64 rows of N
    n_iters, k_iters = n // tn, k // tk
    spec = functools.partial(plgpu.BlockSpec, memory_space=plgpu.SMEM)
    in_specs = [spec((tn, tk), lambda kk: (0, kk), transforms=smem_transforms(plgpu, tk, jnp.int4)),
                spec((m, tk), lambda kk: (0, kk), transforms=smem_transforms(plgpu, tk, jnp.bfloat16))]
    if sb is not None:
        in_specs.append(spec((2, 1, tn), lambda kk: (0, kk, 0)))

    def pipeline(body, context):
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k_iters,), memory_registers=40, in_specs=in_specs, wg_axis="wg", num_compute_wgs=2,
            max_concurrent_steps=stages, compute_context=context)

    def kernel(w_gmem, x_gmem, *rest):
        out_gmem, ins = rest[-1], (w_gmem, x_gmem) + tuple(rest[:-1])
        unused = lambda *_, **__: None  # noqa: E731

        @functools.partial(pl.run_scoped, allocs=pipeline(unused, unused).get_allocations(*ins), collective_axes="wg")
        def _scope(allocs):
            wg = lax.axis_index("wg")

            @plgpu.nd_loop((n_iters,), collective_axes="sm")
            def _tile(info):
                (ni,) = info.index
                mine = pl.ds(wg * 64, 64)

                def context(run):
                    @functools.partial(pl.run_scoped, acc=plgpu.ACC((64, m), jnp.float32))
                    def _acc(acc):
                        run(acc)
                        out_gmem[pl.ds(ni * tn + wg * 64, 64), :] = acc[...]

                def step(_, w_s, x_s, *rest):
                    acc = rest[-1]
                    a = w_s[mine].astype(jnp.bfloat16)  # [64, tk]
                    if sb is not None:
                        row = plgpu.Layout.WGMMA.reduce(1)
                        sc = plgpu.load(rest[0].at[0, 0, mine], (), layout=row)  # [64]
                        of = plgpu.load(rest[0].at[1, 0, mine], (), layout=row)
                        wide = lambda v: plgpu.layout_cast(lax.broadcast_in_dim(v, (64, tk), (0,)),  # noqa: E731
                                                           plgpu.Layout.WGMMA)
                        a = plgpu.layout_cast(a, plgpu.Layout.WGMMA) * wide(sc) + wide(of)
                    plgpu.wgmma(acc, a, _t(plgpu, x_s))
                    plgpu.wgmma_wait(0)
                    return acc

                extra = (rest[0].at[:, :, pl.ds(ni * tn, tn)],) if sb is not None else ()
                pipeline(step, context)(w_gmem.at[pl.ds(ni * tn, tn), :], x_gmem, *extra, allocations=allocs)

    call = plgpu.kernel(kernel, out_type=jax.ShapeDtypeStruct((n, m), jnp.float32), grid=(num_sms,),
                        grid_names=("sm",), num_threads=3, thread_name="wg",
                        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup))
    return call(wq, x, *((sb,) if sb is not None else ()))


def lower_only(rows):
    for m in rows:
        w = jax.ShapeDtypeStruct((N, K), jnp.int4)
        x = jax.ShapeDtypeStruct((m, K), jnp.bfloat16)
        sb = jax.ShapeDtypeStruct((2, K // G, N), jnp.bfloat16)
        for args in ((w, x), (w, x, sb)):
            text = jax.jit(mixed).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
            print({"rows": m, "scaled": len(args) == 3, "lowered_chars": len(text)})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 32, 64])
    ap.add_argument("--lower", action="store_true")
    args = ap.parse_args()
    if args.lower:
        return lower_only(args.rows)
    from pallas_kernels.int4_matmul import reference as ref
    from pallas_kernels.int4_matmul.kernel import int4_matmul

    us = functools.partial(kernel_us, iters=20)

    q = jax.random.randint(jax.random.key(0), (N, K), -8, 8, jnp.int8)
    wq, wbf = q.astype(jnp.int4), q.T.astype(jnp.bfloat16)  # [N, K] int4; [K, N] bf16
    words = jnp.asarray(ref.pack(jax.device_get((q.T + 8).astype(jnp.int32))))  # [K/8, N], zero point 8
    s, z = jnp.ones((K // G, N), jnp.bfloat16), jnp.full((K // G, N), 8.0, jnp.bfloat16)
    sb = jnp.stack([jnp.full((K // G, N), 0.5, jnp.bfloat16), jnp.full((K // G, N), 0.25, jnp.bfloat16)])
    for m in args.rows:
        x = jax.random.normal(jax.random.key(m), (m, K), jnp.bfloat16)
        want, t_bf16 = us(jax.jit(lambda a, b: a @ b), x, wbf)
        want = want.astype(jnp.float32)
        _, t_tri = us(jax.jit(int4_matmul), x, words, s, z)
        row = {"rows": m, "bf16_us": round(t_bf16, 1), "triton_int4_us": round(t_tri, 1)}
        for name, extra, tk, stages, oracle in (
                ("mgpu_tk128", (), 128, 4, want), ("mgpu_tk256", (), 256, 4, want),
                ("scaled_tk128", (sb,), 128, 4, want * 0.5 + 0.25 * jnp.sum(x.astype(jnp.float32), 1, keepdims=True))):
            try:
                out, t = us(jax.jit(functools.partial(mixed, tk=tk, stages=stages)), wq, x, *extra)
            except Exception as e:  # noqa: BLE001 (report and go on)
                row[name + "_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                continue
            row[name + "_us"] = round(t, 1)
            row[name + "_err"] = round(float(jnp.max(jnp.abs(out.T - oracle)) / jnp.max(jnp.abs(oracle))), 4)
            row[name + "_tb_s"] = round(N * K / 2 / t / 1e6, 2)
        print(row, flush=True)


if __name__ == "__main__":
    main()
