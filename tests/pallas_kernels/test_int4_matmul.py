"""pallas_kernels/int4_matmul in interpret mode (CPU in CI; compiled on a GPU) against a float64
numpy oracle of the packing contract, and its XLA reference against the same oracle."""
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int4_matmul import reference as ref
from pallas_kernels.int4_matmul.kernel import default_config, int4_matmul, supported


def _case(m, k, n, g, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (k, n))
    s = rng.uniform(0.001, 0.01, (k // g, n)).astype(np.float32)
    z = rng.integers(0, 16, (k // g, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (q - np.repeat(z, g, 0)) * np.repeat(s, g, 0)  # the contract, written out
    return q, s, z, x, w


def test_pack_is_the_contracts_bit_layout():
    q = np.random.default_rng(0).integers(0, 16, (64, 24))
    words = ref.pack(q).view(np.uint32)
    for r in (0, 8, 63):
        assert all(((words[r // 8] >> (4 * (r % 8))) & 0xF) == q[r])
    assert np.array_equal(np.asarray(ref.unpack(jnp.asarray(ref.pack(q)))), q)


@pytest.mark.parametrize("m,k,n,g,splits", [(1, 512, 64, 128, None), (5, 1024, 96, 128, 2), (16, 512, 32, 512, None),
                                             (33, 768, 64, 256, 1), (16, 1024, 128, 1024, None), (64, 512, 128, 128, 4)])
def test_kernel_and_reference_match_float64(m, k, n, g, splits):
    q, s, z, x, w = _case(m, k, n, g, m + k)
    want = x.astype(np.float64) @ w.astype(np.float64)
    args = (jnp.asarray(x), jnp.asarray(ref.pack(q)), jnp.asarray(s), jnp.asarray(z))
    got = np.asarray(int4_matmul(*args, splits=splits, interpret=True))
    xla = np.asarray(ref.int4_matmul_reference(*args))
    scale = np.abs(want).max()
    assert got.shape == (m, n)
    assert np.abs(got - want).max() < 1e-5 * scale
    assert np.abs(xla - want).max() < 1e-5 * scale


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("layout", ["planes", "rows"])
@pytest.mark.parametrize("convert", ["magic", "offset"])
def test_16_bit_activations_every_variant(dtype, layout, convert):
    """The widening by the float's bits (with 2^m subtracted or folded into the zero point) in
    both layouts: within the 16-bit rounding of the activations and scales."""
    q, s, z, x, _ = _case(16, 512, 64, 128, 7)
    xd, sd, zd = jnp.asarray(x).astype(dtype), jnp.asarray(s).astype(dtype), jnp.asarray(z).astype(dtype)
    w = (q - np.repeat(np.asarray(zd, np.float64), 128, 0)) * np.repeat(np.asarray(sd, np.float64), 128, 0)
    want = np.asarray(xd, np.float64) @ w
    got = np.asarray(int4_matmul(xd, jnp.asarray(ref.pack(q)), sd, zd, layout=layout, convert=convert,
                                 interpret=True), np.float64)
    assert got.dtype == np.float64 and np.abs(got - want).max() < 1e-2 * np.abs(want).max()


def test_configs_and_refusals():
    assert supported(4096, 4096, 32) and not supported(576, 576, 9) and not supported(512, 48, 4)
    assert default_config(1, 4096, 4096, 32)["layout"] == "planes"
    assert default_config(64, 4096, 4096, 32)["layout"] == "rows"
    # k / v of Llama-3-8B: 8 column programs, K split to fill the GPU while a split keeps whole
    # groups and at least 512 inputs
    cfg = default_config(16, 4096, 1024, 32)
    assert cfg["bn"] == 128 and cfg["splits"] == 8
    assert default_config(16, 4096, 28672, 32)["splits"] == 2  # gate_up: 224 column programs
    with pytest.raises(ValueError, match="must divide"):
        int4_matmul(jnp.zeros((1, 512)), jnp.zeros((64, 64), jnp.int32), jnp.zeros((4, 64)), jnp.zeros((4, 64)), bn=128)
    with pytest.raises(ValueError, match="not supported"):
        int4_matmul(jnp.zeros((1, 576)), jnp.zeros((72, 64), jnp.int32), jnp.zeros((9, 64)), jnp.zeros((9, 64)))
