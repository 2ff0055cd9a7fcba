"""Probe (measured, not adopted): decode attention with one program per query row over all KV
heads, against the engine's kernel.py (one program per sequence x KV head), per tile
configuration, in one run; Llama-3-8B heads.

Why: a 1,024-row decode step at ~150 tokens of context spent 205 us per layer in attention where
its K/V at the copy rate take ~150 us: a (sequence, head) program at a short context moves ~77 KB
and its start and end are not hidden. Here a program's KV tile is one whole block of every head,
[BS x Hkv, D] rows lying contiguously in the cache (32 KB of K), and all Hq query heads score it in
one product, each head's pairs with the other heads' keys masked away (Hkv times the products,
which decode has to spare; Hkv times the bytes per program). It is exact for any batch (each row
attends to its sequence's first pos + 1 keys; padding rows store zeros) but re-reads a sequence's
context per query row, so an engine would run it only on decode steps. Result (H200,
docs/benchmarks.md 2026-12-01 eighth session): 0.86-0.91x kernel.py's time at 1,024 x 150,
0.93-0.98x at 1,024 x 192, 1.01-1.02x at 256 x 1,328; as a decode-step variant of the engine's
512- and 1,024-token buckets: 128 / 128 +0.2% (noise), 1024 / 128 -1.1%. Not adopted.

    cd scripts && python3 bench_decode_rows.py [--shapes 1024x150 1024x192 256x1328] [--check-only]

Prints one JSON line per (shape, kernel/config): ms (pipelined) and TB/s of K/V read; every config
is checked against the reference first (max_err).
"""
from __future__ import annotations

import argparse
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from bench_attention import D, HKV, batch, timeit_pipelined
from pallas_kernels.ragged_paged_attention import kernel as K
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

_NEG = -1e30
_LOG2E = 1.4426950408889634

def _program(row_seq_ref, row_pos_ref, block_tables_ref, q_ref, kv_ref, o_ref, *, tk: int, bs: int, hkv: int,
             sm_scale: float):
    # Row t of the batch: its sequence and position (-1: a padding row, no keys, stores zeros).
    # q_ref [T, Hq, D]; kv_ref [2, NB * BS * Hkv, D] (row = token x Hkv + head); o_ref [T, Hq, D].
    t = pl.program_id(0)
    s = row_seq_ref[t]
    pos = row_pos_ref[t]
    hq, d = q_ref.shape[1], q_ref.shape[2]
    g = hq // hkv
    q = pltriton.load(q_ref.at[pl.ds(t, 1), :, :]).reshape(hq, d)
    dt = q.dtype
    q = (q.astype(jnp.float32) * (sm_scale * _LOG2E)).astype(dt)  # scores in log2 units (exp2 below)
    c = jnp.arange(tk * hkv, dtype=jnp.int32)  # tile column = token x Hkv + head
    tok = c // hkv
    head = c % hkv
    blk_col, blk_row = tok // bs, tok % bs
    per_tile = tk // bs
    same = (jnp.arange(hq, dtype=jnp.int32) // g)[:, None] == head[None, :]  # [Hq, C]: a head's own keys

    def step(it, carry):
        m_i, l_i, acc = carry
        blk = block_tables_ref[s, it * per_tile + blk_col]  # [C]
        r = (blk * bs + blk_row) * hkv + head
        k = kv_ref[0, r, :]  # [C, D]: whole blocks, contiguous
        v = kv_ref[1, r, :]
        sc = jnp.dot(q, k.T, preferred_element_type=jnp.float32)  # [Hq, C]
        mask = same & ((it * tk + tok) <= pos)[None, :]
        sc = jnp.where(mask, sc, _NEG)
        m_new = jnp.maximum(m_i, sc.max(axis=-1))
        p = jnp.where(mask, jnp.exp2(sc - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m_i - m_new)
        l_i = l_i * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(dt), v, preferred_element_type=jnp.float32)
        return m_new, l_i, acc

    carry = (jnp.full((hq,), _NEG, jnp.float32), jnp.zeros((hq,), jnp.float32), jnp.zeros((hq, d), jnp.float32))
    _, l_i, acc = jax.lax.fori_loop(0, (pos + tk) // tk, step, carry)  # keys [0, pos]: ceil((pos + 1) / tk)
    out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
    pltriton.store(o_ref.at[pl.ds(t, 1), :, :], out.reshape(1, hq, d).astype(o_ref.dtype))


def row_layout(seq_lens, query_start_loc, num_tokens: int):
    """-> (row_seq, row_pos) [T] int32: each row's sequence and position in it (-1 for padding
    rows past query_start_loc[-1]); a sequence's queries are the last positions of its context."""
    S = seq_lens.shape[0]
    t = jnp.arange(num_tokens, dtype=jnp.int32)
    # compare_all: one fused comparison (the default binary search is a device while loop)
    seq = jnp.clip(jnp.searchsorted(query_start_loc[1:], t, side="right", method="compare_all"), 0, S - 1)
    real = t < query_start_loc[-1]
    pos = jnp.where(real, seq_lens[seq] - (query_start_loc[seq + 1] - t), -1)
    return seq.astype(jnp.int32), pos.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("sm_scale", "tk", "num_warps", "num_stages", "interpret"))
def decode_rows(q, kv_cache, block_tables, seq_lens, query_start_loc, *, sm_scale: float, tk: int = 16,
                num_warps: int = 4, num_stages: int = 2, interpret: bool = False):
    """q [T, Hq, D]; kv_cache [2, NB, BS, Hkv, D] -> [T, Hq, D], the semantics of reference.py.
    tk: KV tokens per iteration (a multiple of the block size; 16 with 4 warps and 2 stages was
    the fastest on an H200, scripts/bench_decode_rows.py)."""
    T, hq, d = q.shape
    _, nb, bs, hkv, _ = kv_cache.shape
    per_tile = max(1, tk // bs)
    tk = per_tile * bs
    mb = block_tables.shape[1]
    if mb % per_tile:  # whole tiles of block-table columns (padding points at the null block 0)
        block_tables = jnp.pad(block_tables, ((0, 0), (0, per_tile - mb % per_tile)))
    kv_rows = kv_cache.reshape(2, nb * bs * hkv, d)  # free: a block's tokens and heads are contiguous
    row_seq, row_pos = row_layout(seq_lens, query_start_loc, T)
    full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    kw = {} if interpret else dict(compiler_params=pltriton.CompilerParams(num_warps=num_warps,
                                                                           num_stages=num_stages))
    return pl.pallas_call(
        functools.partial(_program, tk=tk, bs=bs, hkv=hkv, sm_scale=sm_scale),
        grid=(T,),
        in_specs=[full((T,)), full((T,)), full(block_tables.shape), full(q.shape), full(kv_rows.shape)],
        out_specs=full(q.shape),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        interpret=interpret,
        name="decode_rows",
        **kw,
    )(row_seq, row_pos, block_tables, q, kv_rows)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["1024x150", "1024x192", "512x256", "256x512", "256x1328"])
    ap.add_argument("--check-only", action="store_true")
    a = ap.parse_args()
    interpret = jax.devices()[0].platform != "gpu"
    rng = np.random.default_rng(0)
    scale = D ** -0.5
    ref = jax.jit(functools.partial(ragged_paged_attention_reference, sm_scale=scale))
    confs = [(16, 4, 2), (16, 4, 3), (16, 8, 2), (16, 2, 2)]
    for spec in a.shapes:
        b, c = (int(x) for x in spec.split("x"))
        sets = [batch(rng, [1] * b, [c] * b) for _ in range(2)]
        want = np.asarray(ref(*sets[0]), np.float32)
        engine = jax.jit(functools.partial(K.ragged_paged_attention, sm_scale=scale))
        rows = [("engine", engine)] + [
            (f"rows tk{tk} w{w} st{st}", jax.jit(functools.partial(decode_rows, sm_scale=scale, tk=tk, num_warps=w,
                                                                   num_stages=st, interpret=interpret)))
            for tk, w, st in confs]
        kv_bytes = b * c * HKV * D * 2 * 2
        for name, f in rows:
            try:
                got = np.asarray(f(*sets[0]), np.float32)
                err = float(np.abs(got - want).max())
                t = None if a.check_only else timeit_pipelined(f, sets, iters=30)
            except Exception as e:  # a config Triton cannot build: say so, go on
                print(json.dumps(dict(kind="decode_rows", shape=spec, kernel=name, error=str(e)[:200])), flush=True)
                continue
            print(json.dumps(dict(kind="decode_rows", shape=spec, kernel=name, max_err=err,
                                  ms=None if t is None else t * 1e3,
                                  tb_per_s=None if t is None else kv_bytes / t / 1e12)), flush=True)


if __name__ == "__main__":
    main()
