"""Float8 weights (models/quant.py) against a float64 numpy oracle of the same arithmetic."""
import ml_dtypes
import numpy as np
import pytest
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.models import quant

E4M3 = ml_dtypes.float8_e4m3fn


def _oracle_quantize(w):
    """w [K, N...] -> (q [N..., K] as float64 e4m3 values, s [N...])."""
    w = np.asarray(w, np.float64)
    s = np.maximum(np.abs(w).max(axis=0), 1e-12) / 448.0
    q = np.moveaxis(w, 0, -1) / s[..., None]
    return q.astype(np.float32).astype(E4M3).astype(np.float64), s


@pytest.mark.parametrize("shape", [(64, 48), (32, 2, 24)])
def test_quantize_weight_per_output_channel(shape):
    w = np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.02
    w[..., 3] *= 50  # one loud channel must not cost the others their precision
    got = quant.quantize_weight(jnp.asarray(w))
    q, s = _oracle_quantize(w)
    assert got["q"].dtype == jnp.float8_e4m3fn and got["q"].shape == shape[1:] + shape[:1]
    np.testing.assert_allclose(np.asarray(got["s"]), s, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(got["q"]).astype(np.float64), q)
    # every channel's largest value lands on the format's maximum, so no channel is clipped
    np.testing.assert_array_equal(np.abs(np.asarray(got["q"]).astype(np.float64)).max(-1), 448.0)
    back = np.asarray(quant.dequantize(got))
    assert back.shape == shape
    rel = np.abs(back - w) / np.abs(w).max(axis=0, keepdims=True)
    assert rel.max() <= 2 ** -4 + 1e-6  # e4m3: 3 mantissa bits, half-ulp at the top binade


@pytest.mark.parametrize("shape", [(64, 48), (32, 2, 24)])
@pytest.mark.parametrize("rows,weight_only", [(5, None), (quant.WEIGHT_ONLY_MAX_ROWS + 3, None),
                                              (5, False), (quant.WEIGHT_ONLY_MAX_ROWS + 3, True)])
def test_linear_matches_the_float64_oracle(shape, rows, weight_only):
    rng = np.random.default_rng(1)
    w = rng.standard_normal(shape).astype(np.float32) * 0.02
    x = rng.standard_normal((rows, shape[0])).astype(np.float32)
    x[2] *= 100  # per-token scales: a loud row does not flatten the others
    qw = quant.quantize_weight(jnp.asarray(w))
    got = np.asarray(quant.linear(jnp.asarray(x), qw, weight_only=weight_only), np.float64)
    q, s = _oracle_quantize(w)
    if weight_only or (weight_only is None and rows <= quant.WEIGHT_ONLY_MAX_ROWS):  # activations as they are
        want = np.einsum("tk,...k->t...", x.astype(np.float64), q) * s
    else:  # activations quantized per token too
        sx = np.abs(x).max(-1) / 448.0
        xq = (x / sx[:, None]).astype(E4M3).astype(np.float64)
        want = np.einsum("tk,...k->t...", xq, q) * sx.reshape((-1,) + (1,) * (len(shape) - 1)) * s
    assert got.shape == (rows,) + shape[1:]
    np.testing.assert_allclose(got, want, rtol=1e-2, atol=1e-6 * np.abs(want).max())  # bf16 GEMM output
    ref = np.einsum("tk,k...->t...", x.astype(np.float64), w)  # and close to the unquantized product
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.08


def test_linear_leaves_unquantized_weights_alone():
    x = jnp.ones((3, 8))
    w = jnp.arange(8 * 2 * 5, dtype=jnp.float32).reshape(8, 2, 5)
    np.testing.assert_array_equal(np.asarray(quant.linear(x, w)), np.asarray(jnp.einsum("tk,kgf->tgf", x, w)))


def test_quantize_params_keeps_shardings_and_rejects_unknown_methods():
    mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
    w = jax.device_put(jnp.ones((16, 8), jnp.bfloat16), NamedSharding(mesh, P(None, "model")))
    params = {"layers": [{"wq": w, "attn_norm": jnp.ones(16)}]}
    quant.quantize_params(params, "fp8")
    lp = params["layers"][0]
    assert lp["wq"]["q"].sharding.spec == P("model", None) and lp["wq"]["s"].sharding.spec == P("model")
    assert lp["attn_norm"].dtype == jnp.float32  # norms stay
    with pytest.raises(ValueError, match="fp8"):
        quant.quantize_params(params, "int4")
