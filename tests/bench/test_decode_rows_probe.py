"""The decode probe's kernel (scripts/bench_decode_rows.py: one program per row over all KV heads)
against the jnp reference in interpret mode, so the probe still runs when a GPU is lent: decodes
at block boundaries, padding rows and sequences, and rows of multi-query sequences (exact for any
batch)."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_decode_rows as R  # noqa: E402

from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference  # noqa: E402
from tests.pallas_kernels.test_ragged_paged_attention import make_batch, rel  # noqa: E402

INTERPRET = jax.devices()[0].platform != "gpu"


@pytest.mark.parametrize("q_lens,ctx_lens,tk", [
    ([1] * 6, [1, 15, 16, 17, 33, 64], 16),  # decodes around block boundaries
    ([1, 1, 1], [40, 7, 100], 32),  # two blocks per KV tile
    ([1, 5, 1, 3], [20, 30, 16, 50], 16),  # rows of multi-query sequences: exact too
])
def test_decode_rows_matches_reference(q_lens, ctx_lens, tk):
    rng = np.random.default_rng(len(q_lens))
    q, kv, bt, sl, qsl = make_batch(rng, q_lens, ctx_lens, 16, 4, 32, 16, jnp.float32, pad_tokens=5, pad_seqs=2)
    want = ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=0.2)
    got = R.decode_rows(q, kv, bt, sl, qsl, sm_scale=0.2, tk=tk, interpret=INTERPRET)
    assert rel(got, want) < 1e-5
    assert np.all(np.asarray(got)[int(qsl[-1]):] == 0)  # padding rows: exact zeros


def test_row_layout():
    sl = jnp.asarray([5, 9, 0], jnp.int32)
    qsl = jnp.asarray([0, 1, 4, 4], jnp.int32)  # one decode, a 3-query sequence, a padding sequence
    seq, pos = R.row_layout(sl, qsl, 6)
    assert seq.tolist()[:4] == [0, 1, 1, 1]
    assert pos.tolist() == [4, 6, 7, 8, -1, -1]
