"""Prompts that start in a step, attended densely over the step's own K/V (fresh_prompts.py) while
the paged kernel does the rest: the segment packing against a plain loop, the combined output
against the paged reference on every row, and on a Hopper GPU the same through cuDNN."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import fresh_prompts as FP
from pallas_kernels.ragged_paged_attention import kernel as K
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference, token_layout
from tests.pallas_kernels.test_ragged_paged_attention import _flat_eqns, make_batch, rel

# decodes, a continuation chunk (q_len < ctx), short prompts (under MIN), long prompts, a
# one-token prompt: every route through the three launches
Q_LENS = [1, 40, 24, 1, 9, 30, 3, 1, 24]
CTX = [90, 40, 24, 300, 50, 30, 3, 1, 60]
MIN = 20  # dense_min_len for these small shapes: prompts of 24, 30 and 40 tokens are dense


def step_kv(kv, bt, sl, qsl, T):
    """This step's K/V [T, Hkv, D] read back from the cache (what the layer wrote into it);
    padding tokens zero."""
    seq, pos, valid = token_layout(qsl, sl, T)
    bs = kv.shape[2]
    blk = bt[seq, jnp.maximum(pos, 0) // bs]
    k, v = kv[0][blk, pos % bs], kv[1][blk, pos % bs]
    return tuple(jnp.where(valid[:, None, None], x, 0) for x in (k, v))


def loop_segments(q_lens, ctx, qsl, T, min_len):
    m = T // min_len
    offsets, lengths = [-1] * (m + 1), [-1] * m
    take, j = [], 0
    for i, (n, c) in enumerate(zip(q_lens, ctx)):
        take.append(n == c and n >= min_len)
        if take[-1]:
            offsets[j], lengths[j] = int(qsl[i]), n
            j += 1
    return np.array(take), np.array([offsets]), np.array([lengths])


def test_segments_pack_the_long_fresh_prompts_in_order():
    rng = np.random.default_rng(0)
    q, kv, bt, sl, qsl = make_batch(rng, Q_LENS, CTX, 4, 2, 32, 16, jnp.float32, pad_tokens=5)
    T = q.shape[0]
    take, off, ln = FP.segments(sl, qsl, T, MIN)
    want = loop_segments(Q_LENS + [0], CTX + [0], np.asarray(qsl), T, MIN)
    np.testing.assert_array_equal(np.asarray(take), want[0])
    np.testing.assert_array_equal(np.asarray(off), want[1])
    np.testing.assert_array_equal(np.asarray(ln), want[2])
    assert FP.max_segments(T, MIN) == off.shape[1] - 1 == T // MIN


@pytest.mark.parametrize("seed", range(5))
def test_segment_bound_holds_for_random_steps(seed):
    """However prompts and padding mix, the taken prompts fit the static segment count."""
    rng = np.random.default_rng(seed)
    S = int(rng.integers(1, 12))
    q_lens = [int(x) for x in rng.integers(1, 70, S)]
    fresh = rng.random(S) < 0.6
    ctx = [n if f else n + int(rng.integers(1, 50)) for n, f in zip(q_lens, fresh)]
    T = sum(q_lens) + int(rng.integers(0, 40))
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    take, off, ln = FP.segments(jnp.asarray(ctx, jnp.int32), jnp.asarray(qsl), T, MIN)
    want = loop_segments(q_lens, ctx, qsl, T, MIN)
    assert int(np.sum(want[0])) <= T // MIN
    assert FP.any_taken(np.asarray(ctx, np.int32), qsl, MIN) == bool(np.any(want[0]))  # the runner's host check
    np.testing.assert_array_equal(np.asarray(take), want[0])
    np.testing.assert_array_equal(np.asarray(off), want[1])
    np.testing.assert_array_equal(np.asarray(ln), want[2])


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
def test_dense_prompts_and_paged_launches_cover_every_row(hq, hkv):
    """A prefill bucket with decodes, a continuation chunk, short and long fresh prompts: with the
    long prompts on the dense path (its jnp form here) every real row equals the paged reference,
    padding rows are zero though q is NaN there, and the paged launches are still two."""
    rng = np.random.default_rng(3)
    q, kv, bt, sl, qsl = make_batch(rng, Q_LENS, CTX, hq, hkv, 64, 16, jnp.float32, pad_tokens=9)
    n = int(qsl[-1])
    q = q.at[n:].set(jnp.nan)
    new_kv = step_kv(kv, bt, sl, qsl, q.shape[0])
    ref = np.asarray(ragged_paged_attention_reference(q[:n], kv, bt, sl, qsl, sm_scale=0.125))

    def f(q):
        return K.ragged_paged_attention(q, kv, bt, sl, qsl, new_kv, sm_scale=0.125, dense_prompts="reference",
                                        dense_min_len=MIN)

    got = np.asarray(f(q))
    assert np.all(got[n:] == 0)
    assert rel(got[:n], ref) < 1e-5
    eqns = _flat_eqns(jax.make_jaxpr(f)(q).jaxpr.eqns)
    assert sum(e.primitive.name == "pallas_call" for e in eqns) == 2


def test_dense_reference_leaves_rows_outside_segments_zero_and_matches_per_segment():
    """The jnp contract alone: a segment's rows are causal attention within the segment."""
    rng = np.random.default_rng(4)
    T, hq, hkv, d = 40, 4, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((T, h, d)), jnp.float32) for h in (hq, hkv, hkv))
    off = jnp.asarray([[3, 20, -1, -1]], jnp.int32)
    ln = jnp.asarray([[10, 15, -1]], jnp.int32)
    got = np.asarray(FP.dense_reference(q, k, v, off, ln, sm_scale=0.25))
    outside = np.ones(T, bool)
    for a, L in ((3, 10), (20, 15)):
        outside[a:a + L] = False
        for t in range(a, a + L):
            for h in range(hq):
                x = np.asarray(k[a:t + 1, h // (hq // hkv)], np.float64) @ np.asarray(q[t, h], np.float64) * 0.25
                w = np.exp(x - x.max())
                want = (w / w.sum()) @ np.asarray(v[a:t + 1, h // (hq // hkv)], np.float64)
                np.testing.assert_allclose(got[t, h], want, rtol=1e-5, atol=1e-5)
    assert np.all(got[outside] == 0)


def test_dense_prompts_argument_checks():
    rng = np.random.default_rng(6)
    q, kv, bt, sl, qsl = make_batch(rng, [30], [30], 4, 2, 32, 16, jnp.float32, pad_tokens=2)
    new_kv = step_kv(kv, bt, sl, qsl, q.shape[0])
    with pytest.raises(ValueError, match="needs new_kv"):
        K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=0.1, dense_prompts="reference")
    with pytest.raises(ValueError, match="soft_cap"):
        K.ragged_paged_attention(q, kv, bt, sl, qsl, new_kv, sm_scale=0.1, soft_cap=30.0, dense_prompts="reference")
    with pytest.raises(ValueError, match="impl"):
        K.ragged_paged_attention(q, kv, bt, sl, qsl, new_kv, sm_scale=0.1, dense_prompts="flash", dense_min_len=8)


def test_supported_only_for_16_bit_plain_attention():
    assert not FP.supported(jnp.float32, 128, None, None)
    assert not FP.supported(jnp.bfloat16, 128, 50.0, None)
    assert not FP.supported(jnp.bfloat16, 128, None, 4096)
    assert not FP.supported(jnp.bfloat16, 320, None, None)
    assert FP.supported(jnp.bfloat16, 128, None, None) == FP.cudnn_available()
    if jax.devices()[0].platform != "gpu":
        assert not FP.cudnn_available()


@pytest.mark.skipif(not FP.cudnn_available(), reason="cuDNN packed attention needs a Hopper GPU")
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 8)])
def test_cudnn_prompts_match_the_paged_reference(hq, hkv):
    """On a GPU with cuDNN: the same mixed bucket in bf16 through cuDNN and the Triton kernel."""
    rng = np.random.default_rng(7)
    q_lens = [1, 600, 520, 1, 90, 700, 3]
    ctx = [900, 600, 520, 300, 90, 1000, 3]
    q, kv, bt, sl, qsl = make_batch(rng, q_lens, ctx, hq, hkv, 128, 16, jnp.bfloat16, pad_tokens=11)
    n = int(qsl[-1])
    new_kv = step_kv(kv, bt, sl, qsl, q.shape[0])
    ref = np.asarray(ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=128 ** -0.5), np.float32)
    got = np.asarray(K.ragged_paged_attention(q, kv, bt, sl, qsl, new_kv, sm_scale=128 ** -0.5,
                                              dense_prompts="cudnn"), np.float32)
    assert np.all(got[n:] == 0)
    assert rel(got[:n], ref[:n]) < 1e-2
