"""Probe: cuDNN's packed ("ragged") flash attention for the prompts an engine step starts from
scratch, against the Pallas kernel's prefill launch on the same step (Llama-3-8B heads, bf16).

A prompt whose whole context is in this step (seq_len == its query count) attends only to this
step's own K/V, which sit contiguous in the step's k / v arrays: no block table is needed, and
cuDNN's Hopper flash attention can take them as segments of one packed batch (B = 1, segment
offsets and lengths, causal within each segment). Each spec "PxL+DxC[/S]" is P prompts of L
tokens and D decodes at C tokens of context, padded with empty sequences to S, as
bench_attention.py --mixed builds them. Per spec, pipelined ms per call and error against the jnp
reference: the step in the paged kernel alone, and with its long prompts through cuDNN
(`dense_prompts="cudnn"`, fresh_prompts.py). --probe: the first measurement that led to it
(cuDNN alone, segments padded to S or to P, two offset conventions; the kernel on the whole step
and without its prompts). One JSON line each."""
import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.ragged_paged_attention import kernel as K
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

import bench_attention as BA  # noqa: E402 (scripts/ on sys.path when run as a script)


def step_kv(kv, bt, ctx, qsl):
    """This step's K/V [T, Hkv, D] gathered from the cache (the engine has them before the write)."""
    T = int(qsl[-1])
    seq = np.searchsorted(qsl, np.arange(T), side="right") - 1
    pos = ctx[seq] - (qsl[seq + 1] - qsl[seq]) + (np.arange(T) - qsl[seq])
    blk = bt[seq, pos // BA.BS]
    return kv[0][blk, pos % BA.BS], kv[1][blk, pos % BA.BS]


def segments(q_lens, ctx, qsl, m: int, with_end: bool):
    fresh = [i for i, (n, c) in enumerate(zip(q_lens, ctx)) if n > 1 and n == c]
    off = np.full((1, m + 1), -1, np.int32)
    ln = np.full((1, m), -1, np.int32)
    for j, i in enumerate(fresh):
        off[0, j], ln[0, j] = qsl[i], q_lens[i]
    if with_end and fresh:
        off[0, len(fresh)] = qsl[fresh[-1]] + q_lens[fresh[-1]]
    return fresh, jnp.asarray(off), jnp.asarray(ln)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--specs", nargs="+", default=["8x1024+0x1", "64x128+0x1", "1x8192+0x1",
                                                   "7x1024+504x1100/1024", "56x128+960x200/1024"])
    ap.add_argument("--probe", action="store_true",
                    help="the first probe: cuDNN alone with segments padded to S and to P, two offset conventions")
    args = ap.parse_args()
    from jax._src.cudnn import fused_attention_stablehlo as fa

    try:
        print(json.dumps(dict(kind="cudnn", version=fa.check_cudnn_version())), flush=True)
    except RuntimeError as e:  # no cuDNN (a CPU run of the probe itself)
        print(json.dumps(dict(kind="cudnn", error=str(e))), flush=True)
    scale = BA.D ** -0.5
    ref = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=scale))
    kern = jax.jit(functools.partial(K.ragged_paged_attention, sm_scale=scale))
    with_dense = jax.jit(functools.partial(K.ragged_paged_attention, sm_scale=scale, dense_prompts="cudnn"))
    rng = np.random.default_rng(5)
    for spec in args.specs:
        q_lens, ctx = BA._mixed_batch(rng, spec)
        q, kv, bt, ctx_a, qsl = BA.batch(rng, q_lens, ctx)
        qsl_np, ctx_np, bt_np = np.asarray(qsl), np.asarray(ctx_a), np.asarray(bt)
        k, v = step_kv(kv, bt_np, ctx_np, qsl_np)
        want = np.asarray(ref(q, kv, bt, ctx_a, qsl).astype(jnp.float32))
        p = sum(1 for n, c in zip(q_lens, ctx) if n > 1 and n == c)
        flops = 4 * BA.HQ * BA.D * sum(n * (n + 1) / 2 for n in q_lens if n > 1)
        row = dict(kind="cudnn_prefill", spec=spec, seqs=len(q_lens), prompts=p, tokens=int(qsl_np[-1]),
                   prompt_gflop=flops / 1e9)
        if args.probe:
            probe(row, q, kv, bt, ctx_a, qsl, k, v, q_lens, ctx, want, kern, scale, flops, fa)
        else:
            for name, f, a in (("paged", kern, (q, kv, bt, ctx_a, qsl)),
                               ("dense", with_dense, (q, kv, bt, ctx_a, qsl, (k, v)))):
                got = np.asarray(f(*a).astype(jnp.float32))[:len(want)]
                row[name + "_rel_err"] = float(np.linalg.norm(got - want) / np.linalg.norm(want))
                row[name + "_ms"] = BA.timeit_pipelined(f, [a], iters=20) * 1e3
            row["dense_over_paged"] = row["dense_ms"] / row["paged_ms"]
        print(json.dumps(row), flush=True)


def probe(row, q, kv, bt, ctx_a, qsl, k, v, q_lens, ctx, want, kern, scale, flops, fa):
    """cuDNN alone on the prompts (segments padded to S and to P, -1 after the segments or the
    last one's end first) next to the kernel on the whole step and on the step without them."""
    qsl_np = np.asarray(qsl)
    p = row["prompts"]

    def cudnn(q, k, v, off, ln):
        out = fa.dot_product_attention(q[None], k[None], v[None], None, None, ln, ln, off, off, scale=scale,
                                       mask_type=fa.MaskType.PADDING_CAUSAL, qkv_layout="BTNH")
        return out[0]

    cudnn = jax.jit(cudnn)
    row["kernel_ms"] = BA.timeit_pipelined(kern, [(q, kv, bt, ctx_a, qsl)], iters=20) * 1e3
    # the same step without the prompts: their queries become zero-length sequences
    rest = [0 if (n > 1 and n == c) else n for n, c in zip(q_lens, ctx)]
    rest_ctx = [0 if (n > 1 and n == c) else c for n, c in zip(q_lens, ctx)]
    qsl_rest = jnp.asarray(np.concatenate([[0], np.cumsum(rest)]).astype(np.int32))
    t_rest = int(qsl_rest[-1])
    row["kernel_rest_ms"] = 0.0
    if t_rest:
        q_rest = jnp.zeros((max(t_rest, 16), BA.HQ, BA.D), q.dtype)
        args_rest = (q_rest, kv, bt, jnp.asarray(np.asarray(rest_ctx, np.int32)), qsl_rest)
        row["kernel_rest_ms"] = BA.timeit_pipelined(kern, [args_rest], iters=20) * 1e3
    rows_fresh = np.concatenate([np.arange(qsl_np[i], qsl_np[i + 1]) for i in range(len(q_lens))
                                 if q_lens[i] > 1 and q_lens[i] == ctx[i]])
    for m_name, m in (("S", len(q_lens)), ("P", max(p, 1))):
        for with_end in (False, True):
            tag = f"cudnn_M{m_name}_{'end' if with_end else 'neg'}"
            try:
                _, off, ln = segments(q_lens, ctx, qsl_np, m, with_end)
                got = np.asarray(cudnn(q, k, v, off, ln).astype(jnp.float32))
                row[tag + "_maxerr"] = float(np.abs(got[rows_fresh] - want[rows_fresh]).max())
                row[tag + "_ms"] = BA.timeit_pipelined(cudnn, [(q, k, v, off, ln)], iters=20) * 1e3
            except Exception as e:  # noqa: BLE001 (report and go on: this is a probe)
                row[tag + "_error"] = str(e)[:300]
    if "cudnn_MS_neg_ms" in row:
        row["combined_over_kernel"] = (row["cudnn_MS_neg_ms"] + row["kernel_rest_ms"]) / row["kernel_ms"]
        row["cudnn_tflop_per_s"] = flops / (row["cudnn_MS_neg_ms"] * 1e-3) / 1e12


if __name__ == "__main__":
    main()
