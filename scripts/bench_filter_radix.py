"""top-k / top-p thresholds without sorting the logits: a radix search over the logits' 32-bit
order keys, a few bits per pass, against the engine's sort (runner/sampler.py `_filtered`): in
XLA (impls "broadcast" and "loop", `--bits`) and as the Pallas kernel the sampler uses
(pallas_kernels/filter_thresholds, `--kernel bits:chunk:num_warps`, GPU only). One JSON line per
row count: each variant's time (pipelined calls), temporaries and whether it keeps exactly what
the sort keeps. Inputs: N(0, 3) logits, top_k 50, top_p 0.95 on every row.

Found on an H200 (2026-12-01, docs/benchmarks.md): XLA's GPU backend does not materialize the
per-digit comparisons (the CPU's does: 16-17 GiB at 1,024 rows) but is no faster than the sort
(1,024 rows: 9.8 ms for 4 bits as sibling reductions, 25 ms for 1 bit, the sort 10.1), so the
sampler runs the Pallas kernel: 5.8 ms there.

    python scripts/bench_filter_radix.py [--rows 16 256 1024] [--bits 1 2 4] [--impls broadcast loop]
        [--kernel 2:1024:4 2:2048:8]
"""
import argparse
import functools
import json

import jax
import jax.numpy as jnp

from bench_fp8_gemm import pipelined  # (scripts/ is on sys.path when a script in it runs)
from jaxserve.runner import sampler
from pallas_kernels.filter_thresholds import order_keys as signed_order_keys
from pallas_kernels.filter_thresholds.kernel import filter_thresholds

_NEG_INF = -jnp.inf


def order_keys(x):
    """float32 [...] -> uint32 keys in the same order (-inf lowest; -0.0 is 0.0, as in comparisons;
    NaN not expected)."""
    b = jax.lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    return jnp.where(b >> 31 == 1, ~b, b | jnp.uint32(1 << 31))


def radix_threshold(keys, weights, target, bits: int, impl: str = "broadcast"):
    """keys [S, V] uint32, weights [S, V] (>= 0), target [S] -> [S] uint32: the largest key T with
    sum(weights[keys > T]) >= target, so keeping keys > T keeps the fewest largest elements whose
    weight reaches the target (with their ties). One place of `bits` bits at a time, testing every
    digit of it ([S, 2^bits] sums): impl "broadcast" as one [S, 2^bits, V] comparison reduced over V
    (one pass if XLA fuses it; the CPU backend materializes it), "loop" as 2^bits separate [S, V]
    reductions (never materialized; one pass only if XLA fuses the siblings)."""
    digits = jnp.arange(1 << bits, dtype=jnp.uint32)
    prefix = jnp.zeros(keys.shape[:1], jnp.uint32)
    for shift in range(32 - bits, -1, -bits):
        cand = prefix[:, None] + (digits << shift)[None, :]  # [S, R]: the next place's digits
        if impl == "broadcast":
            above = jnp.sum(jnp.where(keys[:, None, :] > cand[:, :, None], weights[:, None, :], 0), axis=-1)
        else:
            above = jnp.stack([jnp.sum(jnp.where(keys > cand[:, r:r + 1], weights, 0), axis=-1)
                               for r in range(1 << bits)], axis=-1)
        d = jnp.maximum(jnp.sum(above >= target[:, None], axis=-1) - 1, 0).astype(jnp.uint32)
        prefix = prefix + (d << shift)
    return prefix


@functools.partial(jax.jit, static_argnames=("bits", "impl"))
def filtered_radix(scaled, top_k, top_p, min_p, *, bits: int = 4, impl: str = "broadcast"):
    """sampler._filtered's result (scaled [S, V] with tokens outside top-k / top-p / min-p at -inf)
    from radix-searched thresholds; top_k [S] int32 (0: off), top_p, min_p [S] float32."""
    s, v = scaled.shape
    keys = order_keys(scaled)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = radix_threshold(keys, jnp.ones(keys.shape, jnp.int32), k, bits, impl)
    e = jnp.exp(scaled - scaled.max(-1, keepdims=True))  # [S, V] unnormalized probabilities
    pth = radix_threshold(keys, e, top_p * e.sum(-1), bits, impl)
    pth = jnp.where(top_p >= 1.0, jnp.uint32(0), pth)
    thresh = jnp.minimum(jnp.maximum(kth, pth), keys.max(-1) - 1)  # the largest token always stays
    keep = (keys > thresh[:, None]) & (e >= min_p[:, None] * e.max(-1, keepdims=True))
    return jnp.where(keep, scaled, _NEG_INF)


@functools.partial(jax.jit, static_argnames=("bits", "chunk", "num_warps"))
def filtered_kernel(scaled, top_k, top_p, min_p, *, bits: int, chunk: int, num_warps: int):
    """The same result from pallas_kernels/filter_thresholds (one program per row), as the sampler
    applies it (runner/sampler.py _kept_by_thresholds), at temperature 1."""
    ones = jnp.ones(scaled.shape[:1], jnp.float32)
    thresh, m = filter_thresholds(scaled, ones, top_k, top_p, bits=bits, chunk=chunk, num_warps=num_warps)
    keep = (signed_order_keys(scaled) > thresh[:, None]) & (jnp.exp(scaled - m[:, None]) >= min_p[:, None])
    return jnp.where(keep, scaled, _NEG_INF)


@jax.jit
def filtered_sort(scaled, top_k, top_p, min_p):
    """The engine's filter (runner/sampler.py, a sort per row) on the same arguments."""
    fields = dict(temperature=None, seeds=None, counters=None, bias_ids=None, bias_vals=None, presence=None,
                  frequency=None, repetition=None, prompt_ids=None, output_ids=None)
    return sampler._filtered(scaled, sampler.SamplingTensors(top_k=top_k, top_p=top_p, min_p=min_p, **fields))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 256, 1024])
    ap.add_argument("--bits", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--impls", nargs="*", default=["broadcast", "loop"], choices=("broadcast", "loop"))
    ap.add_argument("--kernel", nargs="*", default=["4:256:4", "4:512:8", "4:128:4", "2:1024:4", "2:2048:8",
                                                      "2:512:4"],
                    help="Pallas kernel configurations bits:chunk:num_warps (GPU only)")
    ap.add_argument("--vocab", type=int, default=128256)
    a = ap.parse_args()
    for S in a.rows:
        x = jax.random.normal(jax.random.PRNGKey(S), (S, a.vocab), jnp.float32) * 3
        args = (x, jnp.full((S,), 50, jnp.int32), jnp.full((S,), 0.95, jnp.float32), jnp.zeros((S,), jnp.float32))
        want = filtered_sort(*args) > -jnp.inf
        line = dict(kind="filter_radix", rows=S, vocab=a.vocab, sort_ms=1e3 * pipelined(filtered_sort, args),
                    sort_temp_gib=filtered_sort.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2 ** 30)
        for b in a.bits:
            for impl in a.impls or []:
                f = functools.partial(filtered_radix, bits=b, impl=impl)
                name = f"{impl}{b}"
                try:
                    line[f"{name}_ms"] = 1e3 * pipelined(f, args)
                    line[f"{name}_temp_gib"] = (filtered_radix.lower(*args, bits=b, impl=impl).compile()
                                                .memory_analysis().temp_size_in_bytes / 2 ** 30)
                    line[f"{name}_same_kept"] = bool(jnp.all((f(*args) > -jnp.inf) == want))
                except Exception as e:  # noqa: BLE001 (e.g. out of memory where XLA materializes the search)
                    line[f"{name}_error"] = str(e).splitlines()[0][:160]
        for cfg in a.kernel if jax.default_backend() == "gpu" else []:
            b, c, w = (int(z) for z in cfg.split(":"))
            f = functools.partial(filtered_kernel, bits=b, chunk=c, num_warps=w)
            name = f"kernel{b}_{c}_{w}"
            try:
                line[f"{name}_ms"] = 1e3 * pipelined(f, args)
                line[f"{name}_same_kept"] = bool(jnp.all((f(*args) > -jnp.inf) == want))
            except Exception as e:  # noqa: BLE001
                line[f"{name}_error"] = str(e).splitlines()[0][:160]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
