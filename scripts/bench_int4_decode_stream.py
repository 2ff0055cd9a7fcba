"""Decode's weight stream with 4-bit weights (AWQ / GPTQ, groups of 128): 32 layers of
Llama-3-8B's projections in one program (no attention; scripts/bench_fp8_decode_stream.py's
`stream`), bf16 against float8 weight-only and the 4-bit product written three ways:

  pallas    pallas_kernels/int4_matmul (packed int32 words, widened in registers), a config sweep
  xla       its reference in XLA ops (the words unpacked with shifts, widened, one dot): what
            the engine runs for steps above the kernel's rows
  dequant   uint4 [K, N] widened in groups, one dot (XLA packs uint4 two per byte on the GPU)

Bytes per token: bf16 13.96 GB, float8 6.98, 4-bit 3.49 + 0.22 of scales and zeros. Call 1
(2026-12-01, H200): XLA writes the widened weight out (235 MB of temporaries for gate_up) and
reads it back, 2.4-2.8x bf16's time at 1-64 rows; also timed then and dropped here: uint4 pairs
in bytes (4.6x) and a batched dot per group (3.9x). If the kernel streams its bytes as fast as
bf16 does (~3 TB/s at 1 row), batch-1 decode could run ~3x bf16's 229 tok/s minus the step's
fixed ~0.8 ms. Eleventh session: the inline-PTX widening (`--layouts planes_asm`, now the
kernel's default up to 32 rows) took 16 rows from 4.41 to 3.64 ms (bf16 3.95).

    python scripts/bench_int4_decode_stream.py [--layers 32] [--rows 1 16 64 256 1024]
"""
import argparse
import functools
import json

import jax
import jax.numpy as jnp

from bench_fp8_decode_stream import SHAPES, E, random_layers, stream  # scripts/ is on sys.path when run from it
from bench_fp8_gemm import pipelined
from jaxserve.models import int4, quant
from pallas_kernels.int4_matmul import int4_matmul_reference, unpack
from pallas_kernels.int4_matmul.kernel import MAX_ROWS, int4_matmul
from pallas_kernels.int4_matmul import mgpu
from pallas_kernels.int4_matmul.widen import widen_matmul


CONFIGS = [(128, 0, 4, 3), (64, 0, 4, 3), (128, 0, 8, 3), (128, 0, 4, 4), (64, 4, 4, 3), (128, 0, 2, 3), (256, 0, 4, 3),
           (256, 0, 8, 3)]
# bn, splits (0: the kernel's default_config), warps, stages; each with every --layouts entry
# (lin_pallas)


def lin_dequant(x, w, n):
    q, s, z = w["q4"], w["s"], w["z"]
    groups = s.shape[0]
    wd = ((q.reshape(groups, -1, q.shape[1]).astype(x.dtype) - z[:, None]) * s[:, None]).reshape(q.shape)
    return jnp.dot(x, wd, preferred_element_type=jnp.float32).astype(x.dtype)


def lin_xla(x, w, n):
    return int4_matmul_reference(x, w["qw"], w["s"], w["z"])


def lin_xla_planes(x, w, n):
    """XLA's widening written in plane order (widen.py's layout) and x permuted to match."""
    qw, s, z = w["qw"], w["s"], w["z"]
    k8, cols = qw.shape
    per = k8 // s.shape[0]  # words per group
    planes = (qw[None] >> jnp.arange(0, 32, 4, dtype=jnp.int32)[:, None, None]) & 0xF  # [8, K/8, N]
    zr, sr = jnp.repeat(z, per, axis=0)[None], jnp.repeat(s, per, axis=0)[None]
    wd = ((planes.astype(x.dtype) - zr) * sr).reshape(k8 * 8, cols)
    xp = x.reshape(x.shape[0], k8, 8).transpose(0, 2, 1).reshape(x.shape[0], k8 * 8)
    return jnp.dot(xp, wd, preferred_element_type=jnp.float32).astype(x.dtype)


WIDEN_CONFIGS = [(256, 4), (128, 4), (256, 8), (512, 8)]  # bn, warps of widen.widen


def lin_widen(cfg):
    bn, warps = cfg
    return lambda x, w, n: widen_matmul(x, w["qw"], w["s"], w["z"], bn=bn, warps=warps)


def lin_pallas(cfg):
    """cfg: (bn, splits, warps, stages, layout): layout "default" (the kernel's default_config),
    "planes" / "rows" (jnp widening, offset), "planes_asm" (the inline-PTX widening)."""
    bn, splits, warps, stages, layout = cfg
    kw = {} if layout == "default" else {"layout": layout.removesuffix("_asm"), "asm": layout.endswith("_asm"),
                                         "convert": "offset"}
    return lambda x, w, n: int4_matmul(x, w["qw"], w["s"], w["z"], bn=bn, splits=splits or None, warps=warps,
                                       stages=stages, **kw)


MGPU_CONFIGS = [(128, 8, "cover"), (128, 4, "one_wave"), (256, 4, "one_wave"), (256, 4, "cover")]
# mgpu.py: tk, stages, K-slice policy (default_splits' fill)


def lin_mgpu(cfg):
    tk, stages, fill = cfg

    def lin(x, w, n):
        n_out, k = w["wq"].shape
        sms = getattr(jax.devices()[0], "core_count", 132)  # (the CPU's: tests lower it for CUDA)
        sp = mgpu.default_splits(n_out, k, w["zs"].shape[1], sms, tk, fill)
        return mgpu.int4_matmul_rows(x, w["wq"], w["zs"], splits=sp, stages=stages, tk=tk, num_sms=sms)
    return lin


def to_mgpu(w):
    wq, zs = mgpu.to_rows(w["qw"], w["s"], w["z"])
    return {"wq": wq, "zs": zs}


def to_u4(qw):
    return {"q4": unpack(qw["qw"]).astype(jnp.uint4), "s": qw["s"], "z": qw["z"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16, 64, 256, 1024])
    ap.add_argument("--variants", nargs="+", default=["pallas", "xla", "dequant"],
                    help="pallas | xla | dequant | xla_planes | widen (pallas_kernels/int4_matmul/widen.py + a GEMM) | "
                         "kernel (the Triton kernel's own defaults, as the engine calls it) | mgpu (mgpu.py, a sweep)")
    ap.add_argument("--configs", type=int, nargs="+", help="indices into CONFIGS (default: all)")
    ap.add_argument("--layouts", nargs="+", default=["default"], help="default | planes | planes_asm | rows")
    ap.add_argument("--profile", help="trace dir: profile bf16 and the best Pallas config per row count")
    a = ap.parse_args()
    key = jax.random.PRNGKey(0)
    bf16 = random_layers(a.layers, key)
    qz8, qz4 = jax.jit(quant.quantize_weight), jax.jit(int4.quantize)
    fp8 = [{n: qz8(w) for n, w in lp.items()} for lp in bf16]
    w4 = [{n: qz4(w) for n, w in lp.items()} for lp in bf16]
    u4 = [{n: to_u4(w) for n, w in lp.items()} for lp in w4] if "dequant" in a.variants else None
    mg = [{n: to_mgpu(w) for n, w in lp.items()} for lp in w4] if "mgpu" in a.variants else None
    weights = sum(k * n for k, n in SHAPES.values()) * a.layers
    gb = {"bf16": weights * 2 / 1e9, "fp8": weights / 1e9, "int4": weights * (0.5 + 4 / 128) / 1e9}
    ref1 = [{n: int4.dequantize(w).astype(jnp.bfloat16) for n, w in w4[0].items()}]  # one layer, widened
    for m in a.rows:
        x = jax.random.normal(jax.random.fold_in(key, 99 + m), (m, E), jnp.bfloat16)
        f_b = jax.jit(functools.partial(stream, lin=lambda x, w, n: x @ w))
        f_8 = jax.jit(functools.partial(stream, lin=lambda x, w, n: quant.linear(x, w)))
        t_b, t_8 = pipelined(f_b, (bf16, x)), pipelined(f_8, (fp8, x))
        out = {"kind": "int4_stream", "rows": m, "bf16_ms": t_b * 1e3, "bf16_tb_s": gb["bf16"] / t_b / 1e3,
               "fp8_ms": t_8 * 1e3, "fp8_tb_s": gb["fp8"] / t_8 / 1e3}
        # errors over one layer against the widened weights in bf16 (32 random layers amplify rounding)
        ref = f_b(ref1, x).astype(jnp.float32)

        def run(name, lin, ws):
            f = jax.jit(functools.partial(stream, lin=lin))
            try:
                t = pipelined(f, (ws, x))
            except Exception as e:  # noqa: BLE001 (a config that does not compile)
                return {f"{name}_error": str(e).splitlines()[0][:200]}
            got = f(ws[:1], x).astype(jnp.float32)
            return {f"{name}_ms": t * 1e3, f"{name}_tb_s": gb["int4"] / t / 1e3, f"{name}_over_bf16": t / t_b,
                    f"{name}_rel_err": float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))}

        if "xla" in a.variants:
            out.update(run("xla", lin_xla, w4))
        if "xla_planes" in a.variants:
            out.update(run("xla_planes", lin_xla_planes, w4))
        if "widen" in a.variants:
            for cfg in WIDEN_CONFIGS:
                r = run("widen", lin_widen(cfg), w4)
                print(json.dumps({"rows": m, "widen_config": list(cfg), **r}), flush=True)
        if "dequant" in a.variants:
            out.update(run("dequant", lin_dequant, u4))
        if "kernel" in a.variants and m <= MAX_ROWS:
            out.update(run("kernel", lambda x, w, n: int4_matmul(x, w["qw"], w["s"], w["z"]), w4))
        if "mgpu" in a.variants and m <= mgpu.MAX_ROWS:
            best = None
            for cfg in MGPU_CONFIGS:
                r = run("mgpu", lin_mgpu(cfg), mg)
                print(json.dumps({"rows": m, "mgpu_config": list(cfg), **r}), flush=True)
                if "mgpu_ms" in r and (best is None or r["mgpu_ms"] < best["mgpu_ms"]):
                    best = dict(r, mgpu_config=list(cfg))
            out.update(best or {})
        if "pallas" in a.variants and m <= MAX_ROWS:
            best = None
            base = [CONFIGS[i] for i in a.configs] if a.configs else CONFIGS
            for cfg in [c + (lay,) for lay in a.layouts for c in base]:
                r = run("pallas", lin_pallas(cfg), w4)
                print(json.dumps({"rows": m, "config": list(cfg), **r}), flush=True)
                if "pallas_ms" in r and (best is None or r["pallas_ms"] < best["pallas_ms"]):
                    best = dict(r, pallas_config=list(cfg))
            out.update(best or {})
        print(json.dumps(out), flush=True)
        if a.profile and "pallas" in a.variants and out.get("pallas_config"):
            from jaxserve.bench.profile import summarize, trace_calls

            for name, lin, ws in (("bf16", lambda x, w, n: x @ w, bf16),
                                  ("pallas", lin_pallas(tuple(out["pallas_config"])), w4)):
                d = trace_calls(jax.jit(functools.partial(stream, lin=lin)), (ws, x), 5,
                                f"{a.profile}/{name}_{m}")
                print(json.dumps({"profile": name, "rows": m, **summarize(d, 0.0, top=12)}, default=str), flush=True)


if __name__ == "__main__":
    main()
