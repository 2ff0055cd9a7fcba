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
