"""The top-k / top-p threshold kernel (interpret mode on CPU, Triton on GPU) against its jnp
reference (a sort per row) and both against the numpy oracle of the kept sets; and the sampler's
kernel path against its sort path."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.filter_thresholds import filter_thresholds_reference, order_keys
from pallas_kernels.filter_thresholds.kernel import filter_thresholds
from pallas_kernels.filter_thresholds.xla import radix_thresholds
from tests.filter_oracle import kept_by_sort, random_filter_batch


def test_order_keys_keep_the_floats_order():
    x = np.array([-np.inf, -3e38, -2.0, -1.0, -1e-30, -0.0, 0.0, 1e-30, 1.0, 2.0, 3e38, np.inf], np.float32)
    k = np.asarray(order_keys(jnp.asarray(x)))
    assert np.all(np.diff(k[[0, 1, 2, 3, 4, 5, 7, 8, 9, 10, 11]]) > 0)
    assert k[5] == k[6]  # -0.0 == 0.0, as in comparisons


@pytest.mark.parametrize("impl,vocab,chunk,bits", [("kernel", 1000, 256, 4), ("kernel", 1000, 128, 2),
                                                  ("kernel", 4099, 1024, 2), ("kernel", 300, 512, 1),
                                                  ("xla", 1000, None, 4), ("xla", 4099, None, 2)])
def test_thresholds_match_the_sort(impl, vocab, chunk, bits):
    """The Pallas kernel and its XLA form: vocabularies that are and are not multiples of the chunk
    (masked tail), ties, banned tokens, each filter alone, both, and neither; radix widths."""
    rng = np.random.default_rng(vocab + bits)
    rows = 20
    x, top_k, top_p, min_p, temperature = random_filter_batch(rng, rows, vocab)
    args = tuple(jnp.asarray(a) for a in (x, 1 / temperature, top_k, top_p))
    got = filter_thresholds(*args, chunk=chunk, bits=bits) if impl == "kernel" else radix_thresholds(*args, bits=bits)
    got_t, got_m = (np.asarray(a) for a in got)
    want_t, want_m = (np.asarray(a) for a in filter_thresholds_reference(*args))
    np.testing.assert_array_equal(got_m, want_m)
    checked = 0
    for i in range(rows):
        want = kept_by_sort(x[i], int(top_k[i]), float(top_p[i]), float(min_p[i]), float(temperature[i]))
        if want is None:  # the top-p cut is within rounding of the target: sums may differ there
            continue
        checked += 1
        why = f"row {i}: top_k {top_k[i]} top_p {top_p[i]} temperature {temperature[i]}"
        assert got_t[i] == want_t[i], why
        keys = np.asarray(order_keys(jnp.asarray(x[i])))
        p = np.exp((x[i].astype(np.float64) - x[i].max()) / temperature[i])
        kept = (keys > got_t[i]) & (p >= min_p[i] * p.max()) & (x[i] > -np.inf)
        np.testing.assert_array_equal(kept, want, err_msg=why)
    assert checked >= rows // 2


@pytest.mark.parametrize("impl", ["kernel", "xla"])
def test_rows_that_start_with_whole_chunks_of_banned_tokens(impl):
    """Leading chunks all -inf (a mask over most of the vocabulary), down to one finite token:
    the online max / mass must not turn NaN before the first finite value."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 1000)).astype(np.float32)
    x[:, :300] = -np.inf
    x[2, :999] = -np.inf
    x[3, 500:] = -np.inf
    args = (jnp.asarray(x), jnp.asarray([1.0, 0.5, 1.0, 2.0], jnp.float32), jnp.asarray([5, 0, 0, 0], jnp.int32),
            jnp.asarray([0.9, 0.5, 0.9, 0.7], jnp.float32))
    got = filter_thresholds(*args, chunk=128) if impl == "kernel" else radix_thresholds(*args)
    want = filter_thresholds_reference(*args)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_bad_arguments_are_refused():
    x = jnp.zeros((2, 10))
    with pytest.raises(ValueError, match="bits must divide 32"):
        filter_thresholds(x, jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.ones(2), bits=3)
    with pytest.raises(ValueError, match="power of two"):
        filter_thresholds(x, jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.ones(2), chunk=100)
    with pytest.raises(ValueError, match="bits must divide 32"):
        radix_thresholds(x, jnp.ones(2), jnp.zeros(2, jnp.int32), jnp.ones(2), bits=5)


def test_sampler_threshold_paths_sample_what_the_sort_path_samples():
    """The same batch through the sampler's filtered mode with each implementation pinned (the
    kernel, its XLA form, the sort): the same kept sets, so (same noise) the same tokens; rows
    with temperature 0 stay greedy."""
    from jaxserve.core.sched_output import SamplingState
    from jaxserve.runner import sampler
    from jaxserve.runner.sampling_inputs import pack_sampling

    rng = np.random.default_rng(7)
    rows, vocab = 16, 700
    x, top_k, top_p, min_p, temperature = random_filter_batch(rng, rows, vocab)
    temperature[::5] = 0.0
    states = [SamplingState(temperature=float(temperature[i]), top_k=int(top_k[i]), top_p=float(top_p[i]),
                            min_p=float(min_p[i]), presence_penalty=0.0, frequency_penalty=0.0,
                            repetition_penalty=1.0, seed=i, num_output_tokens=3, logprobs=-1, prompt_logprobs=-1)
              for i in range(rows)]
    sb = pack_sampling(states, rows, 8)
    assert sb.mode == "filtered"
    t = sampler.unpack_sampling(*(jnp.asarray(a) for a in sb.packed()))
    runs = {impl: np.asarray(jax.jit(lambda lg, t, impl=impl: sampler._choose(
        lg, t, "filtered", False, filter_impl=impl))(jnp.asarray(x), t)) for impl in ("sort", "kernel", "xla")}
    ok = [i for i in range(rows) if temperature[i] == 0 or kept_by_sort(
        x[i], int(top_k[i]), float(top_p[i]), float(min_p[i]), float(temperature[i])) is not None]
    assert len(ok) >= rows - 3
    cold = temperature == 0
    for impl in ("kernel", "xla"):
        np.testing.assert_array_equal(runs[impl][ok], runs["sort"][ok], err_msg=impl)
        np.testing.assert_array_equal(runs[impl][cold], x[cold].argmax(-1), err_msg=impl)
