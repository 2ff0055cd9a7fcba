"""On-device sampler vs numpy oracles."""
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.core.sched_output import SamplingState
from jaxserve.runner.sampler import SamplingTensors, sample, sample_tokens, unpack_sampling
from jaxserve.runner.sampling_inputs import pack_sampling

V = 64


def _state(**kw):
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, presence_penalty=0.0,
                frequency_penalty=0.0, repetition_penalty=1.0, seed=1, num_output_tokens=0,
                logprobs=-1, prompt_logprobs=-1)
    base.update(kw)
    return SamplingState(**base)


def _run(logits, states, history=32, k=5):
    sb = pack_sampling(states, len(states), history)
    st = sb.packed()
    out = sample(jnp.asarray(logits), *st, penalties=sb.penalties, num_logprobs=k)
    # The tokens-only variant in the mode the host picks for this batch (greedy / random /
    # filtered) must pick the very same tokens as the general one.
    fast = sample_tokens(jnp.asarray(logits), *st, penalties=sb.penalties, mode=sb.mode)
    np.testing.assert_array_equal(np.asarray(fast), np.asarray(out[0]))
    return [np.asarray(o) for o in out]


def _logits(rows, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, V)).astype(np.float32) * 3


def test_greedy_is_argmax_and_logprobs_match_numpy():
    lg = _logits(4)
    tok, lp, rank, top_ids, top_lps = _run(lg, [_state(temperature=0.0)] * 4)
    np.testing.assert_array_equal(tok, lg.argmax(-1))
    ref = lg - np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lg.max(-1, keepdims=True)
    np.testing.assert_allclose(lp, ref[np.arange(4), tok], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(rank, 1)
    np.testing.assert_array_equal(top_ids, np.argsort(-ref, -1)[:, :5])
    np.testing.assert_allclose(top_lps, np.sort(ref, -1)[:, ::-1][:, :5], rtol=1e-5, atol=1e-5)


def test_seeded_sampling_is_batch_independent():
    lg = _logits(1, seed=3)
    alone = _run(lg, [_state(seed=1234, num_output_tokens=7)])[0][0]
    batch_lg = np.concatenate([_logits(5, seed=9), lg])
    states = [_state(seed=s) for s in range(5)] + [_state(seed=1234, num_output_tokens=7)]
    in_batch = _run(batch_lg, states)[0][-1]
    assert alone == in_batch
    # A different counter gives (almost surely) a different stream of draws.
    # (temperature 2: at 1 the top token of these logits has probability 0.95)
    draws = {int(_run(lg, [_state(seed=1234, num_output_tokens=c, temperature=2.0)])[0][0]) for c in range(20)}
    assert len(draws) > 1


@pytest.mark.parametrize("kw", [dict(top_k=3), dict(top_p=0.3), dict(min_p=0.2)])
def test_filters_only_sample_allowed_tokens(kw):
    lg = _logits(1, seed=5)[0]
    p = np.exp(lg - lg.max())
    p /= p.sum()
    order = np.argsort(-p)
    if "top_k" in kw:
        allowed = set(order[:kw["top_k"]])
    elif "top_p" in kw:
        cum = np.cumsum(p[order])
        allowed = set(order[: int(np.searchsorted(cum, kw["top_p"]) + 1)])
    else:
        allowed = set(np.nonzero(p >= kw["min_p"] * p.max())[0])
    seen = set()
    for s in range(60):
        seen.add(int(_run(lg[None], [_state(seed=s, **kw)])[0][0]))
    assert seen <= allowed
    assert len(seen) >= min(2, len(allowed))


def test_penalties_match_numpy():
    lg = _logits(1, seed=7)[0]
    prompt, output = [1, 2, 3], [3, 4, 4, 5]
    st = _state(temperature=0.0, presence_penalty=0.5, frequency_penalty=0.7, repetition_penalty=1.3,
                prompt_token_ids=prompt, output_token_ids=output)
    ref = lg.copy()
    for t in set(prompt) | set(output):
        ref[t] = ref[t] / 1.3 if ref[t] > 0 else ref[t] * 1.3
    for t in set(output):
        ref[t] -= 0.7 * output.count(t) + 0.5
    tok = _run(lg[None], [st])[0][0]
    assert tok == ref.argmax()
    # Sanity: the penalties change the pick for a logit row built so they must.
    lg2 = np.zeros(V, np.float32)
    lg2[4] = 1.0
    lg2[9] = 0.9
    st2 = _state(temperature=0.0, frequency_penalty=1.0, prompt_token_ids=[0], output_token_ids=[4])
    assert _run(lg2[None], [st2])[0][0] == 9


def test_banned_tokens_and_logit_bias():
    lg = _logits(2, seed=11)
    best = lg.argmax(-1)
    states = [_state(temperature=0.0, banned_token_ids=[int(best[0])]),
              _state(temperature=0.0, logit_bias={17: 100.0})]
    tok = _run(lg, states)[0]
    assert tok[0] != best[0] and tok[0] == np.argsort(-lg[0])[1]
    assert tok[1] == 17


def test_host_picks_the_cheapest_exact_mode():
    """The host picks the sampler variant; a mixed batch gets the one every row needs."""
    pick = lambda states: pack_sampling(states, len(states) + 1, 8).mode  # noqa: E731
    assert pick([_state(temperature=0.0)] * 2) == "greedy"
    assert pick([_state(temperature=0.0), _state()]) == "random"
    assert pick([_state(temperature=0.0), _state(top_p=0.9)]) == "filtered"
    assert pick([_state(temperature=0.0, top_k=5)]) == "greedy"  # filters of greedy rows don't matter
    assert pick([_state(temperature=0.0, repetition_penalty=1.2)]) == "filtered"
    assert pick([_state(temperature=0.0, banned_token_ids=[2]), _state()]) == "biased"
    assert pick([_state(logit_bias={3: 1.0}, top_p=0.5)]) == "filtered"
    # A mixed greedy / random batch: the random variant gives greedy rows their argmax.
    lg = _logits(3, seed=11)
    tok = _run(lg, [_state(temperature=0.0), _state(seed=3), _state(temperature=0.0)])[0]
    assert tok[0] == lg[0].argmax() and tok[2] == lg[2].argmax()


@pytest.mark.parametrize("penalized", [False, True])
def test_packed_sampling_arrays_unpack_bit_exact(penalized):
    """SamplingBatch.packed() -> unpack_sampling gives back every field with its dtype and bits
    (floats such as -inf biases and top_p included), with and without penalty histories."""
    states = [_state(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=2 ** 32 - 3,
                     num_output_tokens=4, logit_bias={3: 2.5}, banned_token_ids=[7],
                     presence_penalty=0.5 if penalized else 0.0, prompt_token_ids=[1, 2], output_token_ids=[9]),
              None, _state(temperature=0.0, num_output_tokens=9)]
    sb = pack_sampling(states, 3, 16)
    t = unpack_sampling(*(jnp.asarray(a) for a in sb.packed()))
    assert isinstance(t, SamplingTensors)
    for name, want in sb.arrays.items():
        got = np.asarray(getattr(t, name))
        assert got.dtype == want.dtype and got.shape == want.shape, name
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8), err_msg=name)


@pytest.mark.parametrize("temperature,bias", [(1.0, None), (0.5, None), (1.0, {2: 2.0, 5: -1.5})])
def test_sampled_frequencies_match_the_softmax(temperature, bias):
    """The hashed Gumbel noise draws from softmax(logits / T) (plus logit_bias): 6000 rows of the
    same logits, each with its own generation counter (so its own noise), against the numpy
    distribution; the total-variation distance of 6000 exact draws over 8 tokens is ~0.02."""
    v, n = 8, 6000
    row = np.random.default_rng(5).standard_normal(v).astype(np.float32)
    states = [_state(temperature=temperature, seed=99, num_output_tokens=i, logit_bias=bias) for i in range(n)]
    sb = pack_sampling(states, n, 8)
    assert sb.mode == ("biased" if bias else "random")
    tok = np.asarray(sample_tokens(jnp.asarray(np.tile(row, (n, 1))), *sb.packed(), penalties=False, mode=sb.mode))
    z = row.astype(np.float64) + (np.array([bias.get(j, 0.0) for j in range(v)]) if bias else 0.0)
    want = np.exp(z / temperature - (z / temperature).max())
    want /= want.sum()
    got = np.bincount(tok, minlength=v) / n
    assert 0.5 * np.abs(got - want).sum() < 0.05, (got, want)
    # Rows of other seeds draw other tokens: the noise depends on the seed, not only the counter.
    other = [_state(temperature=temperature, seed=7, num_output_tokens=i, logit_bias=bias) for i in range(n)]
    sb2 = pack_sampling(other, n, 8)
    tok2 = np.asarray(sample_tokens(jnp.asarray(np.tile(row, (n, 1))), *sb2.packed(), penalties=False, mode=sb2.mode))
    assert (tok2 != tok).mean() > 0.2
