"""Host-side staging: one SchedulerOutput -> padded numpy arrays for one compiled bucket.

Pure numpy (no jax): the runner turns these into device arrays. Every step is padded to a
(token bucket, sequence bucket) pair chosen at start-up, so serving never compiles.
"""
from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass
from typing import Callable

import numpy as np

from jaxserve.core.sched_output import SchedulerOutput


def geometric_buckets(start: int, limit: int, factor: int) -> tuple[int, ...]:
    """start, start*factor, ... capped by limit; limit itself is always the last bucket."""
    out = []
    b = start
    while b < limit:
        out.append(b)
        b *= factor
    out.append(limit)
    return tuple(sorted(set(out)))


def pick_bucket(buckets: tuple[int, ...], n: int) -> int:
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest compiled bucket {buckets[-1]}")
    return buckets[i]


@dataclass
class StepInputs:
    token_ids: np.ndarray  # [T] int32 (padding 0)
    positions: np.ndarray  # [T] int32 (padding 0)
    slot_mapping: np.ndarray  # [T] int32 (padding -> slots of the null block)
    block_tables: np.ndarray  # [S, MB] int32 (padding 0 = null block)
    seq_lens: np.ndarray  # [S] int32 (padding 0)
    query_start_loc: np.ndarray  # [S + 1] int32
    logits_indices: np.ndarray  # [S] int32 last token of each sequence's chunk (padding 0)
    num_tokens: int  # real tokens
    num_seqs: int  # real sequences
    # Rows (indices into the scheduled list) that sample a token this step.
    sample_rows: list[int]


def prepare_inputs(
    sched: SchedulerOutput,
    *,
    block_size: int,
    max_blocks_per_seq: int,
    token_buckets: tuple[int, ...],
    seq_rows: Callable[[int], int],
    lookahead: int = 0,
) -> StepInputs:
    """seq_rows(T) is the sequence bucket compiled with token bucket T (>= T's sequences, since
    every scheduled sequence has at least one token and at most max_num_seqs are scheduled).
    lookahead: block-table columns for this many tokens past the step (multi-step decoding)."""
    num_seqs = len(sched.scheduled)
    num_tokens = sched.total_num_tokens
    T = pick_bucket(token_buckets, num_tokens)
    S = seq_rows(T)
    if S < num_seqs:
        raise ValueError(f"{num_seqs} sequences exceed the {S} rows compiled for {T} tokens")

    token_ids = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    # Padding tokens write into the null block; spread over its slots (harmless duplicates).
    slot_mapping = (np.arange(T, dtype=np.int32) % block_size).astype(np.int32)
    block_tables = np.zeros((S, max_blocks_per_seq), np.int32)
    seq_lens = np.zeros(S, np.int32)
    qsl = np.zeros(S + 1, np.int32)
    logits_indices = np.zeros(S, np.int32)
    sample_rows = []

    bs = block_size
    if num_tokens == num_seqs:  # a decode step (one token per sequence): whole-array writes
        _fill_decodes(sched.scheduled, bs, max_blocks_per_seq, lookahead, token_ids, positions, slot_mapping,
                      block_tables, seq_lens, qsl, logits_indices)
        sample_rows = [i for i, sr in enumerate(sched.scheduled) if sr.sample]
        return StepInputs(token_ids, positions, slot_mapping, block_tables, seq_lens, qsl,
                          logits_indices, num_tokens, num_seqs, sample_rows)
    off = 0
    for i, sr in enumerate(sched.scheduled):
        n = len(sr.token_ids)
        start = sr.num_computed_tokens
        end = start + n
        nblk = -(-(end + lookahead) // bs)
        if nblk > max_blocks_per_seq or nblk > len(sr.block_ids):
            raise ValueError(
                f"sequence {sr.req_id} needs {nblk} blocks, has {len(sr.block_ids)}, "
                f"table width {max_blocks_per_seq}")
        block_tables[i, :nblk] = sr.block_ids[:nblk]
        if n == 1:  # a decode: plain ints are much cheaper than small numpy ops
            token_ids[off] = sr.token_ids[0]
            positions[off] = start
            slot_mapping[off] = sr.block_ids[start // bs] * bs + start % bs
        else:
            pos = np.arange(start, end, dtype=np.int32)
            token_ids[off:off + n] = sr.token_ids
            positions[off:off + n] = pos
            slot_mapping[off:off + n] = block_tables[i, pos // bs] * bs + pos % bs
        seq_lens[i] = end
        off += n
        qsl[i + 1] = off
        logits_indices[i] = off - 1
        if sr.sample:
            sample_rows.append(i)
    qsl[num_seqs + 1:] = off
    assert off == num_tokens, (off, num_tokens)
    return StepInputs(token_ids, positions, slot_mapping, block_tables, seq_lens, qsl,
                      logits_indices, num_tokens, num_seqs, sample_rows)


def _fill_decodes(scheduled, bs: int, max_blocks: int, lookahead: int, token_ids, positions, slot_mapping,
                  block_tables, seq_lens, qsl, logits_indices) -> None:
    """prepare_inputs for n one-token sequences: the per-row Python work is list building, and
    each array is written once (per-row numpy writes cost ~1 us each, 5-6 per row)."""
    n = len(scheduled)
    starts = [sr.num_computed_tokens for sr in scheduled]
    nblks = [-(-(st + 1 + lookahead) // bs) for st in starts]
    for sr, nb in zip(scheduled, nblks):
        if nb > max_blocks or nb > len(sr.block_ids):
            raise ValueError(f"sequence {sr.req_id} needs {nb} blocks, has {len(sr.block_ids)}, "
                             f"table width {max_blocks}")
    token_ids[:n] = [sr.token_ids[0] for sr in scheduled]
    positions[:n] = starts
    slot_mapping[:n] = [sr.block_ids[st // bs] * bs + st % bs for sr, st in zip(scheduled, starts)]
    flat = list(itertools.chain.from_iterable(sr.block_ids[:nb] for sr, nb in zip(scheduled, nblks)))
    counts = np.asarray(nblks, np.int64)
    rows = np.repeat(np.arange(n), counts)
    cols = np.arange(len(flat)) - np.repeat(np.cumsum(counts) - counts, counts)
    block_tables[rows, cols] = flat
    seq_lens[:n] = positions[:n] + 1
    qsl[1:n + 1] = np.arange(1, n + 1)
    qsl[n + 1:] = n
    logits_indices[:n] = np.arange(n)


def pack_step_meta(inp: StepInputs) -> np.ndarray:
    """The step's metadata as one int32 vector, so it reaches the device in one transfer instead
    of six: [positions T | slot_mapping T | block_tables S*MB | seq_lens S | query_start_loc S+1 |
    logits_indices S]. The jitted step slices it apart (unpack in model_runner)."""
    return np.concatenate((inp.positions, inp.slot_mapping, inp.block_tables.reshape(-1), inp.seq_lens,
                           inp.query_start_loc, inp.logits_indices))


def step_meta_layout(length: int, num_tokens: int, max_blocks_per_seq: int) -> tuple[int, ...]:
    """Sizes of pack_step_meta's six parts for a vector of `length` with T = num_tokens rows
    (S follows: length = 2T + S*MB + 3S + 1)."""
    T, MB = num_tokens, max_blocks_per_seq
    S, rem = divmod(length - 2 * T - 1, MB + 3)
    if rem or S < 1:
        raise ValueError(f"step metadata of length {length} does not fit T={T}, MB={MB}")
    return (T, T, S * MB, S, S + 1, S)


def advance_decode(inp: StepInputs, k: int, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sub-step k of a multi-step decode (every real row one token): (positions, slot_mapping,
    seq_lens) moved k tokens on; padding rows are left as they were. New arrays (the originals
    may already be in flight to the device)."""
    n = inp.num_seqs
    pos = inp.positions.copy()
    pos[:n] += k
    slots = inp.slot_mapping.copy()
    p = pos[:n]
    slots[:n] = inp.block_tables[np.arange(n), p // block_size] * block_size + p % block_size
    sl = inp.seq_lens.copy()
    sl[:n] += k
    return pos, slots, sl
