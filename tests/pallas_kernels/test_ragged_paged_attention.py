"""The Pallas kernel (interpret mode on CPU, Triton on GPU) against the jnp reference, and the
reference against a float64 numpy loop. Outputs are poisoned (NaN) first: every element of a real
token must be written."""
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from pallas_kernels.ragged_paged_attention import kernel as K
from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference

ON_GPU = jax.devices()[0].platform == "gpu"


def make_batch(rng, q_lens, ctx_lens, hq, hkv, d, bs, dtype, pad_tokens=3, pad_seqs=1):
    S = len(q_lens) + pad_seqs
    T = sum(q_lens) + pad_tokens
    mb = max(-(-c // bs) for c in ctx_lens) + 1
    nb = sum(-(-c // bs) for c in ctx_lens) + 4
    perm = rng.permutation(np.arange(1, nb))  # shuffled, block 0 never used
    bt = np.zeros((S, mb), np.int32)
    o = 0
    for i, c in enumerate(ctx_lens):
        n = -(-c // bs)
        bt[i, :n] = perm[o:o + n]
        o += n
    qsl = np.zeros(S + 1, np.int32)
    qsl[1:len(q_lens) + 1] = np.cumsum(q_lens)
    qsl[len(q_lens) + 1:] = qsl[len(q_lens)]
    sl = np.zeros(S, np.int32)
    sl[:len(ctx_lens)] = ctx_lens
    q = jnp.asarray(rng.standard_normal((T, hq, d)), dtype)
    kv = jnp.asarray(rng.standard_normal((2, nb, bs, hkv, d)), dtype)
    return q, kv, jnp.asarray(bt), jnp.asarray(sl), jnp.asarray(qsl)


def naive(q, kv, bt, sl, qsl, scale):
    q, kv, bt, sl, qsl = (np.asarray(x, np.float64) if i < 2 else np.asarray(x) for i, x in enumerate((q, kv, bt, sl, qsl)))
    T, hq, d = q.shape
    hkv = kv.shape[3]
    out = np.zeros_like(q)
    for s in range(len(sl)):
        a, b = qsl[s], qsl[s + 1]
        if b == a:
            continue
        L = sl[s]
        Kf = np.concatenate([kv[0, blk] for blk in bt[s]])[:L]
        Vf = np.concatenate([kv[1, blk] for blk in bt[s]])[:L]
        for t in range(a, b):
            p = L - (b - t)
            for h in range(hq):
                x = Kf[:p + 1, h // (hq // hkv)] @ q[t, h] * scale
                w = np.exp(x - x.max())
                out[t, h] = (w / w.sum()) @ Vf[:p + 1, h // (hq // hkv)]
    return out


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


def test_reference_matches_float64_loop():
    rng = np.random.default_rng(0)
    q, kv, bt, sl, qsl = make_batch(rng, [5, 1, 1], [21, 16, 1], 6, 2, 16, 8, jnp.float32)
    got = ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=0.25)
    assert rel(got, naive(q, kv, bt, sl, qsl, 0.25)) < 1e-5
    assert np.all(np.asarray(got)[int(qsl[-1]):] == 0)


CASES = [
    # (q_lens, ctx_lens, hq, hkv, d, bs)
    ([1, 1, 1, 1], [1, 15, 16, 17], 8, 8, 64, 16),  # GQA 1, decode, block boundaries
    ([7, 1, 33], [7, 513, 40], 12, 4, 64, 16),  # GQA 3 (SmolLM2), mixed prefill + decode
    ([3, 1], [515, 2048], 16, 4, 64, 64),  # GQA 4, block 64, long context
    ([17, 2], [17, 70], 16, 2, 128, 16),  # GQA 8, head_dim 128
    ([9, 1, 1], [30, 17, 64], 12, 2, 64, 16),  # GQA 6 (padded to 8: the last head's window leaves Hq)
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype,tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_kernel_matches_reference(case, dtype, tol):
    _check_case(case, dtype, tol, None)


@pytest.mark.parametrize("case", CASES[:3])
def test_split_k_matches_reference(case):
    _check_case(case, jnp.float32, 1e-5, 3)


@pytest.mark.parametrize("kv_tile,kv_splits", [(32, None), (128, 2)])
def test_kv_tile_of_several_blocks(kv_tile, kv_splits):
    """KV tiles gathering 2 and 8 blocks of 16 through the block table (masked and unmasked
    iterations, with and without split-K) on a mixed prefill + decode batch."""
    _check_case(([40, 1, 1], [300, 129, 16], 16, 4, 64, 16), jnp.float32, 1e-5, kv_splits, kv_tile=kv_tile)


def _check_case(case, dtype, tol, kv_splits, **kw):
    q_lens, ctx, hq, hkv, d, bs = case
    rng = np.random.default_rng(len(q_lens) * 7 + d)
    q, kv, bt, sl, qsl = make_batch(rng, q_lens, ctx, hq, hkv, d, bs, dtype)
    scale = d ** -0.5
    ref = ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=scale)
    got = K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=scale, kv_splits=kv_splits, **kw)
    got = np.asarray(got.astype(jnp.float32))
    assert not np.isnan(got).any()
    n = int(qsl[-1])
    assert rel(got[:n], np.asarray(ref.astype(jnp.float32))[:n]) < tol
    assert np.all(got[n:] == 0)


def test_soft_cap_and_sliding_window():
    rng = np.random.default_rng(3)
    q, kv, bt, sl, qsl = make_batch(rng, [9, 1], [40, 33], 4, 2, 64, 16, jnp.float32)
    for kw in (dict(soft_cap=5.0), dict(sliding_window=8), dict(soft_cap=5.0, kv_splits=2)):
        ref = ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=0.125,
                                               **{k: v for k, v in kw.items() if k != "kv_splits"})
        got = K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=0.125, **kw)
        assert rel(got[:10], ref[:10]) < 1e-5


def test_poisoned_output_fully_written():
    """Tiles must cover every real token: compare against NaN-poisoned expectations by running on
    inputs whose every output row is non-zero."""
    rng = np.random.default_rng(5)
    q, kv, bt, sl, qsl = make_batch(rng, [1, 20, 3, 1, 1], [30, 20, 3, 100, 1], 8, 2, 64, 16, jnp.float32,
                                    pad_tokens=0, pad_seqs=0)
    got = np.asarray(K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=0.125, bq=4))
    ref = np.asarray(ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=0.125))
    assert np.all(np.abs(got).sum(-1) > 0)
    assert rel(got, ref) < 1e-5


@pytest.mark.parametrize("kv_splits", [1, 3])
@pytest.mark.parametrize("q_lens,pad_tokens,hq,hkv", [
    ([1], 15, 12, 4),  # decode bucket of 16 with one live sequence: 15 padding tokens, GQA 3
    ([5, 1], 37, 12, 2),  # more padding tokens than a tile holds, GQA 6
    ([3, 1], 0, 8, 2),  # no padding
])
def test_padding_tokens_come_out_zero(q_lens, pad_tokens, hq, hkv, kv_splits):
    """Padding tokens (past query_start_loc[-1]) are written as exact zeros even when their q is
    NaN: the output is uninitialised (NaN in interpret mode), no wrapper pass zeroes it, and a NaN
    there would reach the null block through the next layer's K/V."""
    rng = np.random.default_rng(len(q_lens) + pad_tokens)
    ctx = [c + 20 for c in q_lens]
    q, kv, bt, sl, qsl = make_batch(rng, q_lens, ctx, hq, hkv, 64, 16, jnp.float32, pad_tokens=pad_tokens)
    n = int(qsl[-1])
    q = q.at[n:].set(jnp.nan)
    got = np.asarray(K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=0.125, kv_splits=kv_splits))
    ref = np.asarray(ragged_paged_attention_reference(q[:n], kv, bt, sl, qsl, sm_scale=0.125))
    assert got.shape == q.shape
    assert np.all(got[n:] == 0)
    assert rel(got[:n], ref) < 1e-5


@pytest.mark.parametrize("kv_splits", [1, 2])
def test_wrapper_does_no_layout_work_on_q_or_out(kv_splits):
    """q goes into the pallas_call as given; without split-K the call's output is the result, with
    split-K only the combine (reductions and elementwise ops, no transpose/pad/slice) follows."""
    rng = np.random.default_rng(1)
    q, kv, bt, sl, qsl = make_batch(rng, [1, 1], [20, 9], 12, 4, 64, 16, jnp.float32)
    f = lambda q: K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=0.125, kv_splits=kv_splits)  # noqa: E731
    closed = jax.make_jaxpr(f)(q)
    (jit_eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name in ("pjit", "jit")]
    inner = jit_eqn.params["jaxpr"].jaxpr
    q_var = inner.invars[0]
    (call,) = [e for e in inner.eqns if e.primitive.name == "pallas_call"]
    assert q_var in call.invars
    assert [e.primitive.name for e in inner.eqns if q_var in e.invars] == ["pallas_call"]
    if kv_splits == 1:
        assert inner.outvars[0] is call.outvars[0]
    after = list(_flat_eqns(inner.eqns[inner.eqns.index(call) + 1:]))
    names = {e.primitive.name for e in after}
    assert not names & {"transpose", "pad", "slice", "dynamic_slice", "gather", "reshape", "concatenate"}, names
    # the combine's only select is on the [T, Hq] denominator, not a padding select on [T, Hq, D]
    assert all(e.outvars[0].aval.ndim <= 2 for e in after if e.primitive.name == "select_n")


def _flat_eqns(eqns):
    """The equations, with nested jits (jnp.where is one) inlined."""
    for e in eqns:
        if e.primitive.name in ("pjit", "jit"):
            yield from _flat_eqns(e.params["jaxpr"].jaxpr.eqns)
        else:
            yield e


def test_validation_errors():
    rng = np.random.default_rng(0)
    q, kv, bt, sl, qsl = make_batch(rng, [2], [5], 4, 2, 64, 16, jnp.float32)
    with pytest.raises(ValueError, match="dtype mismatch"):
        K.ragged_paged_attention(q.astype(jnp.bfloat16), kv, bt, sl, qsl, sm_scale=1.0)
    with pytest.raises(ValueError, match="head_dim mismatch"):
        K.ragged_paged_attention(q[..., :32], kv, bt, sl, qsl, sm_scale=1.0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        K.ragged_paged_attention(q[:, :3], kv, bt, sl, qsl, sm_scale=1.0)
    with pytest.raises(ValueError, match="query_start_loc"):
        K.ragged_paged_attention(q, kv, bt, sl, qsl[:-1], sm_scale=1.0)
    with pytest.raises(ValueError, match="kv_tile"):
        K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=1.0, kv_tile=24)
    with pytest.raises(ValueError, match="int32"):
        K.ragged_paged_attention(q, kv, bt.astype(jnp.int64) if jax.config.jax_enable_x64 else bt.astype(jnp.int16),
                                 sl, qsl, sm_scale=1.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("T", [1, 21, 48])
def test_kv_write_kernel_equals_scatter(dtype, T):
    """The Pallas K/V write puts every row exactly where XLA's scatter does (block 0, the null
    block, takes the padding rows and is not compared)."""
    from pallas_kernels.ragged_paged_attention.kv_write import write_kv_pallas
    from pallas_kernels.ragged_paged_attention.reference import write_kv

    rng = np.random.default_rng(T)
    kv = jnp.asarray(rng.standard_normal((2, 9, 16, 2, 64)), dtype)
    slots = jnp.asarray(rng.permutation(np.arange(16, 9 * 16))[:T], jnp.int32)
    k = jnp.asarray(rng.standard_normal((T, 2, 64)), dtype)
    v = jnp.asarray(rng.standard_normal((T, 2, 64)), dtype)
    want = np.asarray(write_kv(kv, k, v, slots).astype(jnp.float32))
    got = np.asarray(write_kv_pallas(jnp.array(kv), k, v, slots).astype(jnp.float32))
    np.testing.assert_array_equal(got[:, 1:], want[:, 1:])
    with pytest.raises(ValueError, match="slot_mapping"):
        write_kv_pallas(jnp.array(kv), k, v, slots[:-1] if T > 1 else slots[:0])


@pytest.mark.parametrize("cache_dtype", [jnp.float8_e4m3fn, jnp.float8_e5m2])
@pytest.mark.parametrize("q_dtype,tol,widen", [(jnp.float32, 1e-5, None), (jnp.bfloat16, 2e-2, None),
                                               (jnp.bfloat16, 2e-2, "float16")])
def test_kernel_reads_a_float8_cache(cache_dtype, q_dtype, tol, widen):
    """A float8 KV cache (--kv-cache-dtype fp8): the kernel widens each loaded tile (to q's dtype,
    or to float16 with fp8_widen_to) and matches the reference reading the same float8 cache."""
    q, kv, bt, sl, qsl = make_batch(np.random.default_rng(11), [7, 1, 33], [7, 513, 40], 12, 4, 64, 16, jnp.float32)
    q, kv = q.astype(q_dtype), kv.astype(cache_dtype)
    ref = ragged_paged_attention_reference(q, kv, bt, sl, qsl, sm_scale=0.125)
    got = K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=0.125, fp8_widen_to=widen)
    assert got.dtype == q.dtype
    n = int(qsl[-1])
    assert rel(np.asarray(got.astype(jnp.float32))[:n], np.asarray(ref.astype(jnp.float32))[:n]) < tol


def test_fp8_widen_to_is_checked():
    q, kv, bt, sl, qsl = make_batch(np.random.default_rng(1), [1], [20], 4, 2, 64, 16, jnp.bfloat16)
    with pytest.raises(ValueError, match="fp8_widen_to"):
        K.ragged_paged_attention(q, kv.astype(jnp.float8_e4m3fn), bt, sl, qsl, sm_scale=0.125, fp8_widen_to="int8")


def test_float8_writes_clip_to_the_format_range():
    from pallas_kernels.ragged_paged_attention.kv_write import write_kv_pallas
    from pallas_kernels.ragged_paged_attention.reference import write_kv

    kv = jnp.zeros((2, 4, 16, 2, 64), jnp.float8_e4m3fn)
    k = jnp.full((3, 2, 64), 1000.0, jnp.bfloat16).at[0].set(-1000.0).at[1].set(0.3)
    slots = jnp.asarray([16, 17, 40], jnp.int32)
    want = np.asarray(write_kv(kv, k, k, slots).astype(jnp.float32))
    got = np.asarray(write_kv_pallas(jnp.array(kv), k, k, slots).astype(jnp.float32))
    np.testing.assert_array_equal(got[:, 1:], want[:, 1:])
    flat = want.reshape(2, -1, 2, 64)
    assert flat[0, 16].min() == -448 and flat[0, 40].max() == 448  # clipped, not NaN
    assert abs(flat[1, 17, 0, 0] - 0.3) < 0.02  # e4m3: 3 mantissa bits


@pytest.mark.parametrize("hq,hkv", [(8, 2), (4, 4)])
def test_decodes_in_a_prefill_bucket_take_their_own_launch(hq, hkv):
    """A prefill-heavy bucket with decodes riding along: the decodes run in a second launch with
    decode tiles (split_decodes), storing into the same output; both ways match the reference,
    padding rows come out zero, and the split is two pallas_calls."""
    rng = np.random.default_rng(21)
    q_lens = [1, 40, 1, 1, 3, 17, 1]
    ctx = [90, 40, 7, 300, 50, 60, 1]
    q, kv, bt, sl, qsl = make_batch(rng, q_lens, ctx, hq, hkv, 64, 16, jnp.float32, pad_tokens=9)
    n = int(qsl[-1])
    q = q.at[n:].set(jnp.nan)
    ref = np.asarray(ragged_paged_attention_reference(q[:n], kv, bt, sl, qsl, sm_scale=0.125))
    f = lambda q, split: K.ragged_paged_attention(q, kv, bt, sl, qsl, sm_scale=0.125, split_decodes=split)  # noqa: E731
    for split in (None, True, False):
        got = np.asarray(f(q, split))
        assert np.all(got[n:] == 0), split
        assert rel(got[:n], ref) < 1e-5, split
    calls = lambda split: sum(e.primitive.name == "pallas_call"  # noqa: E731
                              for e in _flat_eqns(jax.make_jaxpr(lambda q: f(q, split))(q).jaxpr.eqns))
    assert calls(None) == 2 and calls(False) == 1
