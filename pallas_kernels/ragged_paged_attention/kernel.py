"""Ragged paged attention in Pallas (Triton lowering on NVIDIA GPUs, interpret mode on CPU).

Work split: the ragged batch is cut into query tiles of BQ tokens that never cross a sequence
boundary (a decode is one tile of one token); one program runs one (tile, KV head) pair and
processes all G query heads of that KV head together, so each K/V block is read once per tile
for the whole group (GQA without padding the group to 16: G is padded to the next power of two
only, e.g. 3 -> 4). The program walks its sequence's block table with an online softmax in
float32. The tile list is computed in the jitted wrapper from query_start_loc, so one compiled
kernel serves every mix of prefill chunks and decodes of a bucket.

Layout: the kernel reads q [T, Hq, D] and writes the output [T, Hq, D] directly, with no XLA
pass on either. A program's query block is rows [tile start, tile start + BQ) x heads
[h*G, h*G + Gp) of q, loaded and stored under a mask (rows past the tile's end, and the Gp - G
lanes that are the next KV head's query heads or past Hq). The padding tokens (past
query_start_loc[-1]) are tiled as one more sequence of context 0: their programs see no keys and
store exact zeros, so every output element is written by exactly one program.

Each loop iteration gathers a KV tile of several blocks through the block table (64-128 tokens),
and tiles that every query row sees whole skip the causal mask. Small decode batches split each
sequence's KV tiles over several programs (split-K; partials [KS, T, Hq, D]) and combine the
partial softmaxes after.

Layout contract: reference.py. Tuning and measurements: docs/kernels.md, docs/benchmarks.md.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from . import fresh_prompts
from .kv_write import write_kv_pallas as _write_kv_pallas
from .reference import FP8_DTYPES
from .reference import write_kv as _write_kv_ref

_NEG = -1e30
_LOG2E = 1.4426950408889634  # scores are kept in log2 units so the softmax uses exp2 (one MUFU op)


def _next_pow2(n: int) -> int:
    p = 1
    while p < n:
        p *= 2
    return p


def _split_tf32(x):
    """x = hi + lo with hi exactly representable in TF32 (10 mantissa bits)."""
    hi = jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFE000),
                                      jnp.float32)
    return hi, x - hi


def _dot(a, b, exact_f32: bool):
    """a @ b with float32 accumulation. For float32 inputs the GPU's matrix units round operands
    to TF32; three TF32 products (hi*hi + hi*lo + lo*hi) recover float32 accuracy."""
    if not exact_f32:
        return jnp.dot(a, b, preferred_element_type=jnp.float32)
    ah, al = _split_tf32(a)
    bh, bl = _split_tf32(b)
    f = functools.partial(jnp.dot, preferred_element_type=jnp.float32)
    return f(ah, bh) + (f(ah, bl) + f(al, bh))


def _kernel(*refs, nt: int, heavy_first: bool, skip_empty: bool, **kw):
    # heavy_first: launch the last tiles first; in a causal prefill they see the most keys, so
    # the long programs start early and the short ones fill the tail of the grid.
    # skip_empty: a program whose tile is past the work list (it starts at T: the grid is sized
    # for the worst case, e.g. ceil(T / BQ) + S tiles of a prefill launch where hundreds of
    # decodes have no tile) returns after one scalar load instead of running the whole program
    # on masked loads and stores; it stores nothing either way.
    t = nt - 1 - pl.program_id(0) if heavy_first else pl.program_id(0)
    # (the grid ids are read out here: interpret mode cannot lower program_id inside a cond)
    body = functools.partial(_program, t, pl.program_id(1), pl.program_id(2), *refs, **kw)
    if skip_empty:
        tile_start_ref, q_ref = refs[1], refs[5]
        pl.when(tile_start_ref[t] < q_ref.shape[0])(body)
    else:
        body()


def _program(t, h, split, tile_seq_ref, tile_start_ref, tile_end_ref, tile_ctx_ref, block_tables_ref, q_ref, kv_ref,  # inputs
             o_ref, *ml_refs,  # outputs: o, and with split-K also the softmax max and sum per row
             bq: int, g: int, gp: int, block_size: int, kv_tile: int, sm_scale: float, soft_cap: Optional[float],
             sliding_window: Optional[int], ks: int, widen_to=None):
    # t, h, split: this program's tile, KV head and KV split. tile_*_ref [NT] int32: sequence, first query row, the sequence's
    # query end, context length (0 for the padding tiles); q_ref [T, Hq, D]; kv_ref [2, NB*BS, Hkv, D];
    # o_ref [T, Hq, D], or with split-K [KS, T, Hq, D] float32 and ml_refs 2 x [KS, T, Hq].
    # widen_to: with a float8 cache, the dtype its tiles are widened to and the dots run in
    # (None: q's dtype); float16 is one hardware conversion per pair of float8 values on
    # Hopper, where float8 -> bfloat16 is not.
    s = tile_seq_ref[t]
    q_start = tile_start_ref[t]
    q_end = tile_end_ref[t]
    ctx = tile_ctx_ref[t]
    d = q_ref.shape[-1]
    rows = q_start + jnp.arange(bq, dtype=jnp.int32)  # [BQ]
    row_ok = rows < q_end
    # Position of each query row in its sequence: the queries are the last (q_end - seq_start)
    # positions of the context; q_end is the sequence's query end, so pos = ctx - (q_end - row).
    pos = ctx - (q_end - rows)  # [BQ]
    # This program's block of q and of the output: rows [q_start, q_start + BQ) x heads
    # [h*G, h*G + Gp) of [T, Hq, D]. The load is masked to the array's bounds only: rows past q_end
    # (the next sequence's) and lanes >= G (the next KV head's query heads) are read, but every row
    # of the softmax is independent, so they only make rows that are never stored. The store is
    # masked to the tile's own rows and group. The two masks differ on purpose: with one mask for
    # both, built before the loop, the mask stays live in registers across the KV loop, and the
    # kernel was 20-25% slower on an H100 (Llama-3-8B heads, 2k prefill: 168 us against 137 us).
    n_tok, hq = q_ref.shape[0], q_ref.shape[1]
    q_win = (pl.ds(q_start, bq), pl.ds(h * g, gp), slice(None))
    lane = jnp.arange(gp, dtype=jnp.int32)
    in_bounds = _tile_mask(rows < n_tok, h * g + lane < hq if gp != g else None, gp)
    q = pltriton.load(q_ref.at[q_win], mask=_along_d(in_bounds, d), other=0)  # [BQ, Gp, D]
    dt = q.dtype if widen_to is None else jnp.dtype(widen_to)
    # Matmuls in the input dtype with float32 accumulation; float32 inputs get full precision
    # (3xTF32) so the kernel matches the reference to 1e-5.
    exact = dt == jnp.float32
    # Scores in log2 units (x log2 e folded into q's scale; after the cap when there is one).
    q_scale = sm_scale if soft_cap is not None else sm_scale * _LOG2E
    q = (q.astype(jnp.float32) * q_scale).astype(dt).reshape(bq * gp, d)
    pos_m = jnp.broadcast_to(pos[:, None], (bq, gp)).reshape(bq * gp)  # [M]
    ok_m = jnp.broadcast_to(row_ok[:, None], (bq, gp)).reshape(bq * gp)

    # Keys [0, hi) can be seen. A real tile has hi >= 1 (ctx >= its query count); padding and
    # empty tiles have ctx 0, hence hi <= 0: no iterations, and they store exact zeros (and, with
    # split-K, max _NEG and sum 0, which the combine turns into zeros).
    hi = jnp.maximum(jnp.minimum(ctx, jnp.max(jnp.where(row_ok, pos, 0)) + 1), 0)
    min_pos = jnp.min(jnp.where(row_ok, pos, ctx))
    n_it = (hi + kv_tile - 1) // kv_tile  # KV tiles of kv_tile tokens
    if sliding_window is not None:
        lo_it = jnp.maximum(min_pos - sliding_window + 1, 0) // kv_tile
        full_it = lo_it  # with a window every tile is masked
    else:
        lo_it = 0
        full_it = jnp.minimum((min_pos + 1) // kv_tile, n_it)  # tiles every row sees whole: no mask

    # One KV tile = kv_tile // block_size blocks gathered through the block table: token i of the
    # tile is row (i % block_size) of block table entry (it * blocks_per_tile + i // block_size).
    i_tok = jnp.arange(kv_tile, dtype=jnp.int32)
    blk_col = i_tok // block_size
    blk_row = i_tok % block_size
    per_tile = kv_tile // block_size

    def step(it, carry, masked: bool):
        m_i, l_i, acc = carry
        blk = block_tables_ref[s, it * per_tile + blk_col]  # [TK]
        tok = blk * block_size + blk_row
        k = kv_ref[0, tok, h, :]  # [TK, D]
        v = kv_ref[1, tok, h, :]
        if k.dtype != dt:  # a float8 cache: widen to the compute dtype after the (halved) load
            k, v = k.astype(dt), v.astype(dt)
        sc = _dot(q, k.T, exact)  # [M, TK]
        if soft_cap is not None:
            sc = (soft_cap * _LOG2E) * jnp.tanh(sc / soft_cap)
        if masked:
            kpos = it * kv_tile + i_tok
            mask = (kpos[None, :] <= pos_m[:, None]) & (kpos[None, :] < ctx) & ok_m[:, None]
            if sliding_window is not None:
                mask &= kpos[None, :] > pos_m[:, None] - sliding_window
            sc = jnp.where(mask, sc, _NEG)
        m_new = jnp.maximum(m_i, sc.max(axis=-1))
        p = jnp.exp2(sc - m_new[:, None])
        if masked:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp2(m_i - m_new)
        l_i = l_i * alpha + p.sum(axis=-1)
        acc = acc * alpha[:, None] + _dot(p.astype(dt), v, exact)
        return m_new, l_i, acc

    m0 = jnp.full((bq * gp,), _NEG, jnp.float32)
    l0 = jnp.zeros((bq * gp,), jnp.float32)
    a0 = jnp.zeros((bq * gp, d), jnp.float32)
    if ks > 1:  # split-K: this program takes one contiguous share of the sequence's KV tiles
        chunk = (n_it - lo_it + ks - 1) // ks
        start = lo_it + split * chunk
        stop = jnp.maximum(start, jnp.minimum(start + chunk, n_it))
    else:
        start, stop = lo_it, n_it
    mid = jnp.clip(full_it, start, stop)  # [start, mid) unmasked, [mid, stop) masked
    carry = jax.lax.fori_loop(start, mid, functools.partial(step, masked=False), (m0, l0, a0))
    m_i, l_i, acc = jax.lax.fori_loop(mid, stop, functools.partial(step, masked=True), carry)
    out = acc / jnp.where(l_i > 0, l_i, 1.0)[:, None]
    mine = _tile_mask(row_ok, lane < g if gp != g else None, gp)  # [BQ, Gp]: this program's to write
    if ks > 1:
        m_ref, l_ref = ml_refs
        pltriton.store(o_ref.at[(split,) + q_win], out.reshape(bq, gp, d), mask=_along_d(mine, d))
        pltriton.store(m_ref.at[(split,) + q_win[:2]], m_i.reshape(bq, gp), mask=mine)
        pltriton.store(l_ref.at[(split,) + q_win[:2]], l_i.reshape(bq, gp), mask=mine)
    else:
        pltriton.store(o_ref.at[q_win], out.reshape(bq, gp, d).astype(o_ref.dtype), mask=_along_d(mine, d))


def _tile_mask(row_ok, lane_ok, gp: int):
    """row_ok [BQ], lane_ok [Gp] or None (every lane) -> [BQ, Gp] bool."""
    m = row_ok[:, None] if lane_ok is None else row_ok[:, None] & lane_ok[None, :]
    return jnp.broadcast_to(m, (row_ok.shape[0], gp))


def _along_d(mask, d: int):
    """[BQ, Gp] -> [BQ, Gp, D], constant along D (so Triton keeps the loads/stores vectorized)."""
    return jnp.broadcast_to(mask[:, :, None], mask.shape + (d,))


def _validate(q, kv_cache, block_tables, seq_lens, query_start_loc):
    if q.ndim != 3:
        raise ValueError(f"q must be [num_tokens, num_heads, head_dim], got shape {q.shape}")
    if kv_cache.ndim != 5 or kv_cache.shape[0] != 2:
        raise ValueError(f"kv_cache must be [2, num_blocks, block_size, num_kv_heads, head_dim], got {kv_cache.shape}")
    T, hq, d = q.shape
    _, _, bs, hkv, dk = kv_cache.shape
    if dk != d:
        raise ValueError(f"head_dim mismatch: q has {d}, kv_cache has {dk}")
    if d not in (64, 128, 256) and d % 16:
        raise ValueError(f"head_dim {d} is not supported (64, 128, 256 or a multiple of 16)")
    if hq % hkv:
        raise ValueError(f"num_heads {hq} is not a multiple of num_kv_heads {hkv}")
    if bs & (bs - 1) or bs < 8:
        raise ValueError(f"block_size must be a power of two >= 8, got {bs}")
    if q.dtype != kv_cache.dtype and kv_cache.dtype not in FP8_DTYPES:
        raise ValueError(f"dtype mismatch: q is {q.dtype}, kv_cache is {kv_cache.dtype} "
                         "(the cache is q's dtype or float8_e4m3fn / float8_e5m2)")
    if q.dtype not in (jnp.float32, jnp.bfloat16, jnp.float16):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, got {q.dtype}")
    S = seq_lens.shape[0]
    if block_tables.ndim != 2 or block_tables.shape[0] != S:
        raise ValueError(f"block_tables must be [num_seqs={S}, max_blocks], got {block_tables.shape}")
    if query_start_loc.shape != (S + 1,):
        raise ValueError(f"query_start_loc must be [num_seqs + 1 = {S + 1}], got {query_start_loc.shape}")
    for name, a in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if a.dtype != jnp.int32:
            raise ValueError(f"{name} must be int32, got {a.dtype}")


def choose_kv_splits(num_kv_heads: int, num_tokens: int, num_seqs: int) -> int:
    """Split-K for decode-heavy buckets. A decode is one tile, so there are about num_seqs x
    num_kv_heads programs; each sequence's KV tiles are split until there are ~4 programs per SM
    (132 SMs on an H100: one program's pipelined KV tiles fill a large share of an SM's shared
    memory, so a few programs per SM keep enough loads in flight), at most 16 ways."""
    if num_tokens > 2 * num_seqs:
        return 1
    programs = num_seqs * num_kv_heads
    return int(min(16, max(1, -(-528 // programs))))


def choose_tiles(num_tokens: int, num_seqs: int, group: int, block_size: int, dtype,
                 head_dim: int = 128, kv_dtype=None) -> tuple[int, int, int, int]:
    """(query tokens per tile, KV tokens per iteration, warps, pipeline stages) for a bucket.

    Decode-heavy buckets (about one token per sequence) use the smallest query tile that still
    gives the matrix units 16 rows (tokens x padded group); prefill-heavy ones 128 rows over 8
    warps. KV tiles gather several blocks per iteration so each iteration issues enough loads to
    hide memory latency. Float32 inputs (3xTF32 products) use smaller tiles to fit shared memory.
    Decode takes 64-token KV tiles four deep: a short context is only a few tiles, and with
    128-token tiles one program's two stages fill an SM's shared memory, so nothing overlaps a
    program's first loads (H200 sweep: -13 to -17% time at 192 tokens of context, 0 to -5% at
    512-2048; head_dim 256 keeps two stages to fit). Prefill-heavy buckets of 16-bit caches with
    head_dim <= 128 take 64-token KV tiles on 4 warps: an engine step's prompts are short next to
    the long single prompts the 8-warp 128-token tiles were tuned on, and its programs see few
    KV tiles each, so two programs per SM (half the shared memory and registers each) hide each
    other's load latency (H200, bench_attention.py --mixed-sweep: 0.69x the time on 64 prompts of
    128 tokens, 0.87x on 8 of 1024, 0.95x with 504 decodes riding along). A float8 cache (widened to float16 in the
    kernel) decodes with two warps three deep: half the threads issue the same loads, and at 256 x
    1328 that took 0.82x the time of four warps (H200, bench_attention.py --sweep-wide
    --sweep-kv-dtype float8_e4m3fn). The numbers come from the sweeps in
    docs/benchmarks.md (bench_attention.py --sweep, --sweep-wide)."""
    gp = _next_pow2(group)
    decode = num_tokens <= 2 * num_seqs
    if jnp.dtype(dtype) == jnp.float32:
        rows, tk, warps, stages = 16 if decode else 64, 32, 4, 1
    elif decode and kv_dtype is not None and jnp.dtype(kv_dtype) in FP8_DTYPES and head_dim <= 128:
        rows, tk, warps, stages = 16, 64, 2, 3
    elif decode:
        rows, tk, warps, stages = 16, 64, 4, 4 if head_dim <= 128 else 2
    elif head_dim <= 128 and (kv_dtype is None or jnp.dtype(kv_dtype) not in FP8_DTYPES):
        rows, tk, warps, stages = 128, 64, 4, 2
    else:
        rows, tk, warps, stages = 128, 64 if head_dim > 128 else 128, 8, 2
    return max(1, rows // gp), max(block_size, tk), warps, stages


@functools.partial(jax.jit, static_argnames=("sm_scale", "soft_cap", "sliding_window", "interpret", "bq",
                                             "kv_splits", "kv_tile", "num_warps", "num_stages",
                                             "heavy_first", "fp8_widen_to", "split_decodes", "skip_empty",
                                             "dense_prompts", "dense_min_len"))
def ragged_paged_attention(q, kv_cache, block_tables, seq_lens, query_start_loc, new_kv=None, *, sm_scale: float,
                           soft_cap: Optional[float] = None, sliding_window: Optional[int] = None,
                           interpret: Optional[bool] = None, bq: Optional[int] = None,
                           kv_splits: Optional[int] = None, kv_tile: Optional[int] = None,
                           num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                           heavy_first: bool = True, fp8_widen_to: Optional[str] = "float16",
                           split_decodes: Optional[bool] = None, skip_empty: bool = True,
                           dense_prompts: Optional[str] = None, dense_min_len: int = fresh_prompts.MIN_LEN):
    """q [T, Hq, D]; kv_cache [2, NB, BS, Hkv, D] -> [T, Hq, D]; semantics of reference.py.

    fp8_widen_to: with a float8 cache and 16-bit q, the dtype K/V tiles are widened to and both
    dots run in (None: q's dtype). float16 by default: Hopper converts a pair of e4m3 values to
    float16 in one instruction but not to bfloat16, and the decode kernel is issue-bound
    (docs/kernels.md); q and the probabilities are well inside float16's range.
    split_decodes (default: on for prefill-heavy buckets): sequences whose queries fit one decode
    tile (a decode riding along a prefill step) run in a second launch with the decode tiles,
    instead of each taking a prefill tile of 128 matrix rows of which G are real. The two launches
    write disjoint rows of one buffer. bq, kv_tile, num_warps and num_stages set the main launch.
    skip_empty: programs of tiles past the work list return at once (off: the earlier kernel,
    for same-run comparisons).
    dense_prompts ("cudnn" or "reference"; with new_kv, this step's (k, v) [T, Hkv, D] as written
    into the cache): in prefill-heavy buckets, prompts of at least dense_min_len tokens
    that start in this step run as dense causal attention over new_kv (fresh_prompts.py) and the
    paged launches skip them, storing into that output."""
    _validate(q, kv_cache, block_tables, seq_lens, query_start_loc)
    if dense_prompts is not None and (new_kv is None or soft_cap is not None or sliding_window is not None):
        raise ValueError("dense_prompts needs new_kv and runs without soft_cap or sliding_window")
    if fp8_widen_to not in (None, "float16", "bfloat16"):
        raise ValueError(f"fp8_widen_to must be None, 'float16' or 'bfloat16', got {fp8_widen_to!r}")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    T, hq, d = q.shape
    _, _, bs, hkv, _ = kv_cache.shape
    S = seq_lens.shape[0]
    g = hq // hkv
    c_bq, c_tk, c_warps, c_stages = choose_tiles(T, S, g, bs, q.dtype, d, kv_cache.dtype)
    ks = kv_splits or choose_kv_splits(hkv, T, S)
    main = (bq or c_bq, kv_tile or c_tk, num_warps or c_warps, num_stages or c_stages)
    tk = main[1]
    if tk % bs or tk & (tk - 1):
        raise ValueError(f"kv_tile must be a power-of-two multiple of block_size {bs}, got {tk}")
    decode_bucket = T <= 2 * S
    if split_decodes is None:
        split_decodes = not decode_bucket
    split_decodes = split_decodes and ks == 1
    side = choose_tiles(S, S, g, bs, q.dtype, d, kv_cache.dtype) if split_decodes else None  # the decode launch's tiles
    per_tile = max(tk, side[1] if side else tk) // bs
    mb = block_tables.shape[1]
    if mb % per_tile:  # whole tiles of block-table columns (padding points at the null block 0)
        block_tables = jnp.pad(block_tables, ((0, 0), (0, per_tile - mb % per_tile)))
    nb = kv_cache.shape[1]
    kv_tokens = kv_cache.reshape(2, nb * bs, hkv, d)  # free: tokens of a block are contiguous
    widen = fp8_widen_to if kv_cache.dtype in FP8_DTYPES and q.dtype != jnp.float32 else None
    launch = functools.partial(_launch, q, kv_tokens, block_tables, g=g, bs=bs, sm_scale=sm_scale, soft_cap=soft_cap,
                               sliding_window=sliding_window, heavy_first=heavy_first, widen=widen,
                               skip_empty=skip_empty, interpret=interpret)
    if not split_decodes:
        tiles = _tile_list(seq_lens, query_start_loc, T, main[0])
        res = launch(tiles, *main, ks=ks)
        return res if ks == 1 else _combine_splits(*res).astype(q.dtype)
    q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    short = q_len <= side[0]  # one decode tile holds all of the sequence's queries
    rest, out = ~short, None
    if dense_prompts is not None and fresh_prompts.max_segments(T, dense_min_len) > 0:
        taken, offsets, lengths = fresh_prompts.segments(seq_lens, query_start_loc, T, dense_min_len)
        out = fresh_prompts.dense(q, *new_kv, offsets, lengths, sm_scale=sm_scale, impl=dense_prompts)
        rest = rest & ~taken
    # Decode launch: one tile per short sequence, nothing else stored; then the main launch over
    # the other sequences and the padding tokens, each storing into the same buffer.
    out = launch(_tile_list(seq_lens, query_start_loc, T, side[0], include=short, pad=False, num_tiles=S),
                 *side, ks=1, into=out)
    return launch(_tile_list(seq_lens, query_start_loc, T, main[0], include=rest), *main, ks=1, into=out)


def _launch(q, kv_tokens, block_tables, tiles, bq: int, tk: int, warps: int, stages: int, *, ks: int, g: int,
            bs: int, sm_scale, soft_cap, sliding_window, heavy_first: bool, widen, interpret: bool, skip_empty: bool,
            into=None):
    """One pallas_call over a tile list (tile_seq, tile_start, tile_end, tile_ctx, each [NT]).
    into: an output buffer [T, Hq, D] the call stores into (aliased, so its rows this call does not
    own keep what an earlier launch stored). Returns [T, Hq, D], or with ks > 1 the partials."""
    NT = tiles[0].shape[0]
    T, hq, d = q.shape
    hkv = kv_tokens.shape[2]
    kernel = functools.partial(_kernel, bq=bq, g=g, gp=_next_pow2(g), block_size=bs, kv_tile=tk, sm_scale=sm_scale,
                               soft_cap=soft_cap, sliding_window=sliding_window, ks=ks, nt=NT,
                               heavy_first=heavy_first, skip_empty=skip_empty, widen_to=widen)
    full = lambda shape: pl.BlockSpec(shape, lambda t, h, p: (0,) * len(shape))  # noqa: E731
    kwargs = {}
    if not interpret:
        kwargs["compiler_params"] = pltriton.CompilerParams(num_warps=warps, num_stages=stages)
    # Every element of the output (and of the split-K partials) is stored by exactly one program,
    # the padding tokens' by the padding tiles, so no buffer is zeroed first.
    if ks > 1:
        part = (ks, T, hq, d)
        out_shape = [jax.ShapeDtypeStruct(part, jnp.float32), jax.ShapeDtypeStruct(part[:-1], jnp.float32),
                     jax.ShapeDtypeStruct(part[:-1], jnp.float32)]
        out_specs = [full(part), full(part[:-1]), full(part[:-1])]
    else:
        out_shape, out_specs = jax.ShapeDtypeStruct(q.shape, q.dtype), full(q.shape)
    in_specs = [full((NT,))] * 4 + [full(block_tables.shape), full(q.shape), full(kv_tokens.shape)]
    args = (*tiles, block_tables, q, kv_tokens)
    if into is not None:
        in_specs.append(full(q.shape))
        args += (into,)
        kwargs["input_output_aliases"] = {len(args) - 1: 0}
        kernel = functools.partial(_drop_aliased_input, kernel, len(args) - 1)
    return pl.pallas_call(
        kernel,
        grid=(NT, hkv, ks),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        interpret=interpret,
        name="ragged_paged_attention",
        **kwargs,
    )(*args)


def _drop_aliased_input(kernel, index, *refs):
    """The aliased output buffer is an input only to carry the earlier launch's rows: not read."""
    return kernel(*refs[:index], *refs[index + 1:])


def _combine_splits(o_p, m_p, l_p):
    """o_p [KS, T, Hq, D], m_p, l_p [KS, T, Hq] (maxima in log2 units) -> [T, Hq, D] float32.
    A split that saw no keys has max _NEG, sum 0 and output 0, so it gets weight 0; a row no
    split saw (a padding token) comes out 0."""
    m = m_p.max(axis=0)  # [T, Hq]
    w = jnp.exp2(m_p - m[None]) * l_p  # [KS, T, Hq]
    den = w.sum(axis=0)
    return (o_p * w[..., None]).sum(axis=0) / jnp.where(den > 0, den, 1.0)[..., None]


def _tile_list(seq_lens, query_start_loc, num_tokens: int, bq: int, include=None, pad: bool = True,
               num_tiles: Optional[int] = None):
    """The kernel's work list: each sequence's queries cut into tiles of bq rows, then the
    padding tokens [query_start_loc[-1], T) cut the same way as one more sequence of context 0.
    The padding tiles' programs see no keys and store zeros: those rows feed the next layer's K/V
    for the padding tokens, written into the null block 0, and must be finite (a masked KV tile
    reading block 0 multiplies them by p = 0, and 0 x NaN = NaN). This is the cheapest zeroing:
    the grid already holds these programs (they were idle), so it costs a few masked stores and no
    memset or select pass over [T, Hq, D]. Tiles left over start and end at T and store nothing.
    include [S] bool: only these sequences get tiles (the others are another launch's); pad=False:
    no padding tiles either (every tile past the real ones stores nothing); num_tiles: NT when a
    smaller bound is known (one decode tile per sequence: S).

    seq_lens [S], query_start_loc [S + 1] int32 -> tile_seq, tile_start, tile_end, tile_ctx,
    each [NT] int32 with NT = ceil(T / bq) + S: the sequence (clipped to S - 1 for padding
    tiles, whose loops never read its block table), first query row, the sequence's query end and
    its context length.

    NT is enough: sum_s ceil(q_len_s / bq) <= (N + S (bq - 1)) / bq for N real tokens, which
    leaves at least (T - N + S) / bq tiles, >= ceil((T - N) / bq), for the padding tokens."""
    S = seq_lens.shape[0]
    T = num_tokens
    q_len = query_start_loc[1:] - query_start_loc[:-1]  # [S]
    n_tiles = (q_len + bq - 1) // bq
    if include is not None:
        n_tiles = jnp.where(include, n_tiles, 0)
    cum = jnp.cumsum(n_tiles)
    first = cum - n_tiles
    NT = num_tiles or -(-T // bq) + S  # static upper bound on the number of tiles
    tid = jnp.arange(NT, dtype=jnp.int32)
    # compare_all: one fused comparison; the default binary search is a device while loop, which
    # on GPUs costs a host round trip per iteration (it dominated small decode batches).
    tile_seq = jnp.clip(jnp.searchsorted(cum, tid, side="right", method="compare_all"), 0, S - 1).astype(jnp.int32)
    real = tid < cum[-1]
    pad_start = jnp.minimum(query_start_loc[-1] + (tid - cum[-1]) * bq, T) if pad else T
    tile_start = jnp.where(real, query_start_loc[tile_seq] + (tid - first[tile_seq]) * bq, pad_start)
    tile_end = jnp.where(real, query_start_loc[tile_seq + 1], T)
    tile_ctx = jnp.where(real, seq_lens[tile_seq], 0)
    return tile_seq, tile_start.astype(jnp.int32), tile_end.astype(jnp.int32), tile_ctx.astype(jnp.int32)


def write_kv(kv_cache, k, v, slot_mapping):
    """Write this step's K/V into their slots, in place when the cache is donated. On GPUs the
    Pallas write kernel (kv_write.py: 1.6x XLA's scatter for a 256-token decode step, 6-7x for
    2k-8k-token prefill steps on an H100, docs/benchmarks.md); elsewhere XLA's scatter (the
    kernel's interpret mode would only be slower)."""
    if jax.devices()[0].platform == "gpu":
        return _write_kv_pallas(kv_cache, k, v, slot_mapping)
    return _write_kv_ref(kv_cache, k, v, slot_mapping)
