"""Host staging of one step: the packed metadata vector comes apart on the device into exactly
the arrays prepare_inputs built (one transfer instead of six)."""
import numpy as np
import pytest

from jaxserve.core.sched_output import SamplingState, ScheduledRequest, SchedulerOutput
from jaxserve.runner.input_batch import pack_step_meta, prepare_inputs, step_meta_layout
from jaxserve.runner.model_runner import _unpack_meta


def _state():
    return SamplingState(temperature=0.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0,
                         frequency_penalty=0.0, repetition_penalty=1.0, seed=0, num_output_tokens=0,
                         logprobs=-1, prompt_logprobs=-1)


@pytest.mark.parametrize("lookahead", [0, 3])
def test_packed_metadata_unpacks_to_the_staged_arrays(lookahead):
    rng = np.random.default_rng(0)
    bs, mb = 4, 8
    # a prefill chunk of 7 tokens after 2 computed, then three one-token decodes
    reqs = [ScheduledRequest("a", rng.integers(5, 90, 7).tolist(), 2, [5, 9, 3], True, _state())]
    for i, (computed, blocks) in enumerate([(5, [11, 12]), (0, [7]), (12, [1, 2, 4, 6])]):
        reqs.append(ScheduledRequest(f"d{i}", [int(rng.integers(5, 90))], computed, blocks, True, _state()))
    if lookahead:  # multi-step decode blocks reserve table columns ahead; decodes only
        reqs = reqs[1:]
        for r in reqs:
            r.block_ids = r.block_ids + [20 + len(r.block_ids)]
    so = SchedulerOutput(scheduled=reqs, total_num_tokens=sum(len(r.token_ids) for r in reqs))
    inp = prepare_inputs(so, block_size=bs, max_blocks_per_seq=mb, token_buckets=(16, 64),
                         seq_rows=lambda T: min(T, 8), lookahead=lookahead)
    meta = pack_step_meta(inp)
    assert meta.dtype == np.int32
    pos, md, li = _unpack_meta(meta, len(inp.token_ids), mb)
    np.testing.assert_array_equal(np.asarray(pos), inp.positions)
    np.testing.assert_array_equal(np.asarray(md.slot_mapping), inp.slot_mapping)
    np.testing.assert_array_equal(np.asarray(md.block_tables), inp.block_tables)
    np.testing.assert_array_equal(np.asarray(md.seq_lens), inp.seq_lens)
    np.testing.assert_array_equal(np.asarray(md.query_start_loc), inp.query_start_loc)
    np.testing.assert_array_equal(np.asarray(li), inp.logits_indices)


def test_meta_layout_rejects_a_vector_of_the_wrong_length():
    T, S, MB = 16, 8, 4
    assert step_meta_layout(2 * T + S * MB + 3 * S + 1, T, MB) == (T, T, S * MB, S, S + 1, S)
    with pytest.raises(ValueError, match="does not fit"):
        step_meta_layout(2 * T + S * MB + 3 * S, T, MB)


def _oracle(reqs, bs, mb, T, S, lookahead):
    """prepare_inputs' arrays, one token at a time."""
    tok, pos, slots = np.zeros(T, np.int32), np.zeros(T, np.int32), np.arange(T, dtype=np.int32) % bs
    bt, sl, qsl, li = np.zeros((S, mb), np.int32), np.zeros(S, np.int32), np.zeros(S + 1, np.int32), np.zeros(S, np.int32)
    off = 0
    for i, r in enumerate(reqs):
        for j, t in enumerate(r.token_ids):
            p = r.num_computed_tokens + j
            tok[off], pos[off], slots[off] = t, p, r.block_ids[p // bs] * bs + p % bs
            off += 1
        n = -(-(r.num_computed_tokens + len(r.token_ids) + lookahead) // bs)
        bt[i, :n] = r.block_ids[:n]
        sl[i], qsl[i + 1], li[i] = r.num_computed_tokens + len(r.token_ids), off, off - 1
    qsl[len(reqs) + 1:] = off
    return tok, pos, slots, bt, sl, qsl, li


@pytest.mark.parametrize("lookahead", [0, 5])
@pytest.mark.parametrize("decode_only", [True, False])
def test_prepare_inputs_matches_a_token_by_token_oracle(lookahead, decode_only):
    """Decode steps take a whole-array path, mixed steps a per-sequence one: both give the
    oracle's arrays, and a sequence short of blocks is refused on both."""
    rng = np.random.default_rng(3)
    bs, mb = 4, 9
    lookahead = lookahead if decode_only else 0  # multi-step lookahead is for decode blocks only
    reqs = []
    for i in range(11):
        computed = int(rng.integers(0, 20))
        n = 1 if decode_only or i % 3 else int(rng.integers(2, 6))
        blocks = rng.permutation(np.arange(1, 60))[:-(-(computed + n + lookahead) // bs)].tolist()
        reqs.append(ScheduledRequest(f"r{i}", rng.integers(5, 90, n).tolist(), computed, blocks, i % 4 != 1, _state()))
    so = SchedulerOutput(scheduled=reqs, total_num_tokens=sum(len(r.token_ids) for r in reqs))
    kw = dict(block_size=bs, max_blocks_per_seq=mb, token_buckets=(16, 64), seq_rows=lambda T: 16,
              lookahead=lookahead)
    inp = prepare_inputs(so, **kw)
    want = _oracle(reqs, bs, mb, len(inp.token_ids), 16, kw["lookahead"])
    got = (inp.token_ids, inp.positions, inp.slot_mapping, inp.block_tables, inp.seq_lens, inp.query_start_loc,
           inp.logits_indices)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert inp.sample_rows == [i for i in range(11) if i % 4 != 1]
    reqs[4].block_ids = reqs[4].block_ids[:-1]
    with pytest.raises(ValueError, match="r4 needs"):
        prepare_inputs(so, **kw)
