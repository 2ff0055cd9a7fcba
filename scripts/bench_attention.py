"""Time ragged paged attention on the GPU, in one run: the Pallas kernel, JAX's own
jax.experimental.pallas.ops.gpu.paged_attention (decode only; head-major layout, no 1/sqrt(d)
scaling, so q is pre-scaled) and the XLA reference, for Llama-3-8B heads (32 q / 8 kv / 128).
Also checks the kernel against the reference on every shape. Prints JSON lines and a table with
achieved bytes/s (decode, vs the measured copy bandwidth) and FLOP/s (prefill, vs bf16 matmul)."""
import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import kernel as K
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

HQ, HKV, D, BS = 32, 8, 128, 16


def timeit(f, args_list, iters=20):
    for a in args_list:
        jax.block_until_ready(f(*a))
    ts = []
    for i in range(iters):
        a = args_list[i % len(args_list)]
        t0 = time.perf_counter()
        jax.block_until_ready(f(*a))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def timeit_pipelined(f, args_list, iters=40):
    """Seconds per call with calls dispatched back to back and one wait at the end: the device's
    time per call once host dispatch overlaps it (as inside the engine's jitted step), for
    shapes where host-timed single calls mostly measure dispatch."""
    for a in args_list:
        jax.block_until_ready(f(*a))
    t0 = time.perf_counter()
    out = None
    for i in range(iters):
        out = f(*args_list[i % len(args_list)])
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / iters


def batch(rng, q_lens, ctx, dtype=jnp.bfloat16):
    S = len(q_lens)
    nblk = [-(-c // BS) for c in ctx]
    nb = sum(nblk) + 1
    mb = max(nblk)
    perm = rng.permutation(np.arange(1, nb))
    bt = np.zeros((S, mb), np.int32)
    o = 0
    for i, n in enumerate(nblk):
        bt[i, :n] = perm[o:o + n]
        o += n
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    T = int(qsl[-1])
    key = jax.random.PRNGKey(int(rng.integers(1 << 30)))
    q = jax.random.normal(key, (T, HQ, D), dtype)
    kv = jax.random.normal(jax.random.fold_in(key, 1), (2, nb, BS, HKV, D), dtype)
    return q, kv, jnp.asarray(bt), jnp.asarray(np.asarray(ctx, np.int32)), jnp.asarray(qsl)


def sweep(decode_shapes=None, wide=False, kv_dtype=None, fp8_widen_to=None):
    """Tile configurations (query rows, KV tokens per iteration, warps, pipeline stages, KV splits)
    on a few decode and prefill shapes, timed with pipelined dispatch; one JSON line per (shape,
    config). decode_shapes [(batch, ctx)] replaces the default shapes (decode only); wide sweeps
    every KV tile x stages x warps for one KV split; kv_dtype (e.g. float8_e4m3fn) stores the
    cache in that type (q stays bf16), as `--kv-cache-dtype fp8` does; fp8_widen_to is passed to
    the kernel (the dtype float8 tiles are widened to)."""
    rng = np.random.default_rng(1)
    scale = D ** -0.5
    shapes = [("decode", 1, 8192), ("decode", 32, 512), ("decode", 32, 2048), ("decode", 32, 8192),
              ("decode", 64, 2048), ("decode", 128, 2048), ("decode", 256, 2048), ("prefill", 1, 4096),
              ("prefill", 1, 8192)]
    if decode_shapes:
        shapes = [("decode", b, c) for b, c in decode_shapes]
    for kind, b, c in shapes:
        sets = [batch(rng, [1] * b, [c] * b) if kind == "decode" else batch(rng, [c], [c]) for _ in range(2)]
        if kv_dtype is not None:
            sets = [(q, kv.astype(kv_dtype), *rest) for q, kv, *rest in sets]
        kv_bytes = jnp.dtype(sets[0][1].dtype).itemsize
        if kind == "decode" and wide:
            confs = [(None, None, None, None, None)] + [(None, tk, w, st, 1) for tk in (32, 64, 128, 256)
                                                        for st in (2, 3, 4) for w in (2, 4, 8)]
        elif kind == "decode":  # (bq, kv_tile, warps, stages, kv_splits); None = the kernel's choice
            confs = [(None, None, None, None, None)] + [(None, tk, 4, 2, ks) for tk in (64, 128) for ks in (1, 2, 4)]
            confs += [(None, 128, 4, 3, 1), (None, 64, 4, 3, 2)]
        else:
            confs = [(None, None, None, None, None), (16, 64, 4, 2, 1), (32, 64, 8, 2, 1), (32, 64, 8, 3, 1),
                     (32, 128, 8, 3, 1), (16, 128, 4, 2, 1), (64, 64, 8, 2, 1)]
        for bq, tk, w, st, ks in confs:
            f = jax.jit(functools.partial(K.ragged_paged_attention, sm_scale=scale, bq=bq, kv_tile=tk,
                                          num_warps=w, num_stages=st, kv_splits=ks, fp8_widen_to=fp8_widen_to))
            try:
                t = timeit_pipelined(f, sets, iters=20)
            except Exception as e:  # a config Triton cannot build (e.g. shared memory): report, go on
                print(json.dumps(dict(kind="sweep", shape=kind, batch=b, ctx=c, bq=bq, kv_tile=tk, warps=w,
                                      stages=st, kv_splits=ks, error=str(e)[:160])), flush=True)
                continue
            if kind == "decode":
                perf = dict(tb_per_s=(b * c * HKV * D * 2 * kv_bytes + 4 * b * HQ * D) / t / 1e12)
            else:
                perf = dict(tflop_per_s=4 * HQ * D * c * (c + 1) / 2 / t / 1e12)
            print(json.dumps(dict(kind="sweep", shape=kind, batch=b, ctx=c, bq=bq, kv_tile=tk, warps=w, stages=st,
                                  kv_splits=ks, kv_dtype=str(sets[0][1].dtype), fp8_widen_to=fp8_widen_to,
                                  pipelined_ms=t * 1e3, **perf)), flush=True)


def _mixed_batch(rng, spec):
    """"PxL+DxC[/S]": P prompts of L tokens, D decodes at C tokens of context, interleaved as a
    step's rows are, then sequences of no tokens up to S (the engine pads its sequence bucket)."""
    spec, _, pad = spec.partition("/")
    pre, dec = spec.split("+")
    p, n = (int(x) for x in pre.split("x"))
    nd, c = (int(x) for x in dec.split("x"))
    q_lens, ctx = [n] * p + [1] * nd, [n] * p + [c] * nd
    order = rng.permutation(len(q_lens))
    q_lens, ctx = [q_lens[i] for i in order], [ctx[i] for i in order]
    extra = max(0, int(pad or 0) - len(q_lens))
    return q_lens + [0] * extra, ctx + [0] * extra


def _mixed_cases(specs, seed: int, kv_dtype=None):
    """Per spec: (spec, query lengths, two input sets, the reference output of the first)."""
    rng = np.random.default_rng(seed)
    ref = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=D ** -0.5))
    for spec in specs:
        q_lens, ctx = _mixed_batch(rng, spec)
        sets = [batch(rng, q_lens, ctx) for _ in range(2)]
        if kv_dtype is not None:
            sets = [(q, kv.astype(kv_dtype), *rest) for q, kv, *rest in sets]
        yield spec, q_lens, sets, ref(*sets[0]).astype(jnp.float32)


# Main-launch tiles for --mixed-sweep: (skip_empty, query tokens per tile, KV tokens, warps, stages);
# None = the kernel's choice. The first is the kernel and tiles before skip_empty and the 4-warp
# prefill tiles (2026-12-01), the baseline of the ratios.
MIXED_CONFS = [(False, 32, 128, 8, 2), (True, 32, 128, 8, 2), (True, None, None, None, None), (True, 32, 64, 8, 3),
               (True, 32, 64, 8, 2), (True, 16, 64, 4, 2), (True, 16, 64, 4, 3), (True, 32, 128, 8, 3),
               (True, 64, 64, 8, 2)]


def mixed_sweep(specs, confs=None):
    """The prefill (main) launch's tile configurations on engine-like mixed steps, pipelined;
    each checked against the reference. One JSON line per (spec, config)."""
    scale = D ** -0.5
    for spec, q_lens, sets, want in _mixed_cases(specs, seed=3):
        flops = 4 * HQ * D * sum(n * (n + 1) / 2 for n in q_lens if n > 1)
        base = None
        for skip, bq, tk, w, st in confs or MIXED_CONFS:
            f = jax.jit(functools.partial(K.ragged_paged_attention, sm_scale=scale, skip_empty=skip, bq=bq,
                                          kv_tile=tk, num_warps=w, num_stages=st))
            row = dict(kind="mixed_sweep", spec=spec, seqs=len(q_lens), skip_empty=skip, bq=bq, kv_tile=tk,
                       warps=w, stages=st)
            try:
                got = f(*sets[0]).astype(jnp.float32)
                t = timeit_pipelined(f, sets, iters=20)
            except Exception as e:  # a config Triton cannot build: report, go on
                print(json.dumps(dict(row, error=str(e)[:160])), flush=True)
                continue
            base = base or t
            row.update(rel_err=float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)), ms=t * 1e3,
                       over_base=t / base, prefill_tflop_per_s=flops / t / 1e12)
            print(json.dumps(row), flush=True)


def mixed(specs, kv_dtype=None, fp8_widen_to="float16"):
    """Prefill steps with decodes riding along, as the engine's mixed steps are: each spec
    "PxL+DxC[/S]" is P prompts of L tokens (a whole prompt, causal) and D decodes at C tokens of
    context (padded with empty sequences to S). Times the kernel with the decodes in their own
    launch (split_decodes, the default for such buckets) and in the prefill tiles, pipelined, and
    checks both against the reference."""
    scale = D ** -0.5
    for spec, q_lens, sets, want in _mixed_cases(specs, seed=2, kv_dtype=kv_dtype):
        row = dict(kind="mixed", spec=spec, tokens=sum(q_lens), kv_dtype=str(sets[0][1].dtype))
        for split in (True, False):
            f = jax.jit(functools.partial(K.ragged_paged_attention, sm_scale=scale, split_decodes=split,
                                          fp8_widen_to=fp8_widen_to))
            got = f(*sets[0]).astype(jnp.float32)
            row[f"rel_err_split_{split}"] = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
            row[f"ms_split_{split}"] = timeit_pipelined(f, sets, iters=20) * 1e3
        row["split_over_one_launch"] = row["ms_split_True"] / row["ms_split_False"]
        print(json.dumps(row), flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="also time tile configurations on a few shapes")
    ap.add_argument("--sweep-only", action="store_true", help="only the tile sweep")
    ap.add_argument("--sweep-decode", nargs="+", default=None, metavar="BxCTX",
                    help="decode shapes for the sweep instead of its defaults, e.g. 256x192 1024x192")
    ap.add_argument("--sweep-wide", action="store_true", help="every KV tile x stages x warps (one KV split)")
    ap.add_argument("--sweep-kv-dtype", default=None, help="cache dtype for the sweep, e.g. float8_e4m3fn")
    ap.add_argument("--sweep-fp8-widen", default="float16", choices=("float16", "bfloat16", "none"),
                    help="the kernel's fp8_widen_to for --sweep and --mixed (none: q's dtype; default: the "
                         "kernel's, float16)")
    ap.add_argument("--mixed", nargs="+", default=None, metavar="PxL+DxC",
                    help="only time mixed prefill+decode batches, e.g. 7x1024+256x1100 (decodes in their "
                         "own launch vs in the prefill tiles)")
    ap.add_argument("--mixed-sweep", nargs="+", default=None, metavar="PxL+DxC[/S]",
                    help="only time the prefill launch's tile configurations (MIXED_CONFS) on mixed steps, "
                         "e.g. 8x1024+504x1100/1024 (S: sequences in the bucket, padded with empty ones)")
    ap.add_argument("--mixed-confs", nargs="+", default=None, metavar="SKIP,BQ,TK,W,ST",
                    help="--mixed-sweep configurations instead of MIXED_CONFS, e.g. 0,32,128,8,2 1,-,-,-,- "
                         "(- = the kernel's choice)")
    args = ap.parse_args()
    if args.mixed_sweep:
        confs = None
        if args.mixed_confs:
            confs = [tuple(None if x == "-" else int(x) for x in c.split(",")) for c in args.mixed_confs]
            confs = [(bool(c[0]), *c[1:]) for c in confs]
        return mixed_sweep(args.mixed_sweep, confs)
    if args.sweep_fp8_widen == "none":
        args.sweep_fp8_widen = None
    if args.mixed:
        return mixed(args.mixed, args.sweep_kv_dtype, args.sweep_fp8_widen)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.sweep_decode] if args.sweep_decode else None
    if args.sweep_only:
        return sweep(shapes, args.sweep_wide, args.sweep_kv_dtype, args.sweep_fp8_widen)
    from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa

    rng = np.random.default_rng(0)
    scale = D ** -0.5
    kern = jax.jit(lambda q, kv, bt, sl, qsl: K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=scale))
    ref = jax.jit(lambda q, kv, bt, sl, qsl: ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=scale))
    # The previous kernel's loop shape (one 16-token block per iteration), for the same-run ratio.
    kern_v1 = jax.jit(lambda q, kv, bt, sl, qsl: K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=scale,
                                                                           kv_tile=BS, num_stages=2,
                                                                           heavy_first=False))
    rows = []
    decode = [(b, c) for b in (1, 32, 128, 256) for c in (512, 2048, 8192, 32768) if b * c <= 256 * 8192]
    if args.quick:
        decode = [(1, 2048), (32, 2048), (128, 2048)]
    for b, c in decode:
        sets = [batch(rng, [1] * b, [c] * b) for _ in range(2)]
        q, kv, bt, sl, qsl = sets[0]
        err = float(jnp.linalg.norm((kern(*sets[0]) - ref(*sets[0])).astype(jnp.float32)) /
                    jnp.linalg.norm(ref(*sets[0]).astype(jnp.float32)))
        t_k = timeit(kern, sets)
        t_1 = timeit(kern_v1, sets)
        t_r = timeit(ref, sets)
        # JAX's kernel: head-major pages [Hkv, pages, page, D], q [B, Hq, D] pre-scaled.
        jsets = []
        for q, kv, bt, sl, _ in sets:
            kp = kv[0].transpose(2, 0, 1, 3)
            vp = kv[1].transpose(2, 0, 1, 3)
            jsets.append(((q * scale).astype(q.dtype), kp, vp, bt, sl))
        jf = jax.jit(lambda q, kp, vp, bt, sl: jax_pa.paged_attention(q, kp, vp, bt, sl, pages_per_compute_block=8,
                                                                       k_splits=16 if c >= 8192 else 4))
        try:
            t_j = timeit(jf, jsets)
            tp_j = timeit_pipelined(jf, jsets)
        except Exception as e:  # report, don't stop the run
            print("jax paged_attention failed:", str(e)[:200])
            t_j = tp_j = float("nan")
        tp_k = timeit_pipelined(kern, sets)
        nbytes = b * c * HKV * D * 2 * 2 + 2 * b * HQ * D * 2
        rows.append(dict(kind="decode", batch=b, ctx=c, rel_err=err, kernel_ms=t_k * 1e3, one_block_ms=t_1 * 1e3,
                         jax_pa_ms=t_j * 1e3, kernel_pipelined_ms=tp_k * 1e3, jax_pa_pipelined_ms=tp_j * 1e3,
                         kernel_pipelined_bytes_per_s=nbytes / tp_k,
                         xla_ref_ms=t_r * 1e3, kernel_bytes_per_s=nbytes / t_k))
        print(json.dumps(rows[-1]), flush=True)
    prefill = [512, 2048, 4096, 8192] if not args.quick else [512, 2048]
    for n in prefill:
        sets = [batch(rng, [n], [n]) for _ in range(2)]
        err = float(jnp.linalg.norm((kern(*sets[0]) - ref(*sets[0])).astype(jnp.float32)) /
                    jnp.linalg.norm(ref(*sets[0]).astype(jnp.float32)))
        t_k = timeit(kern, sets, iters=10)
        tp_k = timeit_pipelined(kern, sets, iters=20)
        t_1 = timeit(kern_v1, sets, iters=10)
        t_r = timeit(ref, sets, iters=5)
        flops = 4 * HQ * D * n * (n + 1) / 2  # causal: QK^T and PV over the lower triangle
        rows.append(dict(kind="prefill", chunk=n, rel_err=err, kernel_ms=t_k * 1e3, one_block_ms=t_1 * 1e3,
                         kernel_pipelined_ms=tp_k * 1e3, kernel_pipelined_flops=flops / tp_k,
                         xla_ref_ms=t_r * 1e3,
                         kernel_flops=flops / t_k))
        print(json.dumps(rows[-1]), flush=True)
    if args.sweep:
        sweep(shapes, args.sweep_wide, args.sweep_kv_dtype, args.sweep_fp8_widen)


if __name__ == "__main__":
    main()
