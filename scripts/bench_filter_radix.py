"""top-k / top-p thresholds without sorting the logits: the radix search over the logits' 32-bit
order keys (pallas_kernels/filter_thresholds) against the sort (runner/sampler.py `_filtered`),
in its two forms: XLA ops (`--xla-bits`, the sampler's choice below 64 rows on GPUs) and the
Pallas kernel (`--kernel bits:chunk:num_warps`, GPU only; the sampler's choice from 64 rows).
One JSON line per row count: each variant's time (pipelined calls), temporaries and whether it
keeps exactly what the sort keeps. Inputs: N(0, 3) logits, top_k 50 and top_p 0.95 on every row.

Found on an H200 (2026-12-01, docs/benchmarks.md): the XLA form is 2.1x faster than the sort at 16
rows and slower from 256 (each pass re-reads the row through XLA's reductions); the kernel (one
program per row) is 1.7x faster at 1,024 rows and ties the sort at 64-128.

    python scripts/bench_filter_radix.py [--rows 16 64 256 1024] [--xla-bits 2 4] [--kernel 2:1024:4 2:2048:8]
"""
import argparse
import functools
import json

import jax
import jax.numpy as jnp

from bench_fp8_gemm import pipelined  # (scripts/ is on sys.path when a script in it runs)
from jaxserve.runner import sampler
from pallas_kernels.filter_thresholds import order_keys
from pallas_kernels.filter_thresholds.kernel import filter_thresholds
from pallas_kernels.filter_thresholds.xla import radix_thresholds

_NEG_INF = -jnp.inf


def _apply(scaled, thresh, m, min_p):
    keep = (order_keys(scaled) > thresh[:, None]) & (jnp.exp(scaled - m[:, None]) >= min_p[:, None])
    return jnp.where(keep, scaled, _NEG_INF)


@functools.partial(jax.jit, static_argnames=("bits",))
def filtered_xla(scaled, top_k, top_p, min_p, *, bits: int):
    """scaled [S, V] with the tokens outside top-k / top-p / min-p at -inf (temperature 1), from
    the XLA form's thresholds, as the sampler applies them (sampler._kept_by_thresholds)."""
    return _apply(scaled, *radix_thresholds(scaled, jnp.ones(scaled.shape[:1]), top_k, top_p, bits=bits), min_p)


@functools.partial(jax.jit, static_argnames=("bits", "chunk", "num_warps"))
def filtered_kernel(scaled, top_k, top_p, min_p, *, bits: int, chunk: int, num_warps: int):
    """The same from the Pallas kernel's thresholds."""
    ones = jnp.ones(scaled.shape[:1], jnp.float32)
    return _apply(scaled, *filter_thresholds(scaled, ones, top_k, top_p, bits=bits, chunk=chunk,
                                             num_warps=num_warps), min_p)


@jax.jit
def filtered_sort(scaled, top_k, top_p, min_p):
    """The sampler's sort path (runner/sampler.py) on the same arguments."""
    fields = dict(temperature=None, seeds=None, counters=None, bias_ids=None, bias_vals=None, presence=None,
                  frequency=None, repetition=None, prompt_ids=None, output_ids=None)
    return sampler._filtered(scaled, sampler.SamplingTensors(top_k=top_k, top_p=top_p, min_p=min_p, **fields))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, nargs="+", default=[16, 64, 256, 1024])
    ap.add_argument("--xla-bits", type=int, nargs="*", default=[2, 4])
    ap.add_argument("--kernel", nargs="*", default=["2:1024:4", "2:2048:8", "4:256:4"],
                    help="Pallas kernel configurations bits:chunk:num_warps (GPU only)")
    ap.add_argument("--vocab", type=int, default=128256)
    a = ap.parse_args()
    for S in a.rows:
        x = jax.random.normal(jax.random.PRNGKey(S), (S, a.vocab), jnp.float32) * 3
        args = (x, jnp.full((S,), 50, jnp.int32), jnp.full((S,), 0.95, jnp.float32), jnp.zeros((S,), jnp.float32))
        want = filtered_sort(*args) > -jnp.inf
        line = dict(kind="filter_radix", rows=S, vocab=a.vocab, sort_ms=1e3 * pipelined(filtered_sort, args),
                    sort_temp_gib=filtered_sort.lower(*args).compile().memory_analysis().temp_size_in_bytes / 2 ** 30)
        variants = {f"xla{b}": functools.partial(filtered_xla, bits=b) for b in a.xla_bits}
        for cfg in a.kernel if jax.default_backend() == "gpu" else []:
            b, c, w = (int(z) for z in cfg.split(":"))
            variants[f"kernel{b}_{c}_{w}"] = functools.partial(filtered_kernel, bits=b, chunk=c, num_warps=w)
        for name, f in variants.items():
            try:
                line[f"{name}_ms"] = 1e3 * pipelined(f, args)
                line[f"{name}_temp_gib"] = (f.func.lower(*args, **f.keywords).compile().memory_analysis()
                                            .temp_size_in_bytes / 2 ** 30)
                line[f"{name}_same_kept"] = bool(jnp.all((f(*args) > -jnp.inf) == want))
            except Exception as e:  # noqa: BLE001 (e.g. out of memory where XLA materializes the search)
                line[f"{name}_error"] = str(e).splitlines()[0][:160]
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
