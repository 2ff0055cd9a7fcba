"""pallas_kernels/swiglu_matmul: the Mosaic-GPU kernel compiles only for a Hopper GPU (wgmma). On the
CPU it is traced and lowered for CUDA (Mosaic GPU's lowering runs in Python, so a change that
breaks the kernel's program fails here) and executed by Mosaic GPU's interpreter against the
reference, which is checked against the formula in float64. The engine does not use it
(kernel.py's status)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.swiglu_matmul.kernel import Config, supported, swiglu_matmul
from pallas_kernels.swiglu_matmul.reference import swiglu_matmul_reference

HOPPER = jax.devices()[0].platform == "gpu" and str(getattr(jax.devices()[0], "compute_capability", "")) == "9.0"


def _case(t, e, f, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((t, e)).astype(np.float32)
    w = (rng.standard_normal((e, 2, f)) * 0.05).astype(np.float32)
    return x, w


def test_reference_is_silu_of_gate_times_up_in_float64():
    x, w = _case(8, 64, 48, 0)
    g, u = x.astype(np.float64) @ w[:, 0], x.astype(np.float64) @ w[:, 1]
    want = g / (1 + np.exp(-g)) * u
    with jax.default_matmul_precision("highest"):
        got = np.asarray(swiglu_matmul_reference(jnp.asarray(x), jnp.asarray(w)))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("t,e,f,cfg", [(1024, 4096, 14336, Config()), (512, 256, 384, Config(stages=4, snake_minor=0))])
def test_kernel_lowers_for_cuda(t, e, f, cfg):
    x = jax.ShapeDtypeStruct((t, e), jnp.bfloat16)
    w = jax.ShapeDtypeStruct((e, 2, f), jnp.bfloat16)
    lowered = jax.jit(functools.partial(swiglu_matmul, cfg=cfg, num_sms=132)).trace(x, w).lower(
        lowering_platforms=("cuda",))
    assert "mosaic_gpu" in lowered.as_text()


def test_shapes_it_refuses_are_explained():
    assert supported(512, 256, 384, jnp.bfloat16) and not supported(500, 256, 384, jnp.bfloat16)
    assert not supported(512, 256, 384, jnp.float32)
    with pytest.raises(ValueError, match="T % 128"):
        swiglu_matmul(jnp.zeros((100, 256), jnp.bfloat16), jnp.zeros((256, 2, 384), jnp.bfloat16), num_sms=132)
    with pytest.raises(ValueError, match="w \\[E, 2, F\\]"):
        swiglu_matmul(jnp.zeros((128, 256), jnp.bfloat16), jnp.zeros((256, 384), jnp.bfloat16), num_sms=132)


def _interpret_params():
    try:  # a private module of jax (0.10): Mosaic GPU's interpreter, which simulates threads, barriers, TMA, wgmma
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    except ImportError:
        pytest.skip("this jax has no Mosaic-GPU interpret mode")
    return InterpretGPUParams()


def test_kernel_runs_in_mosaic_gpu_interpret_mode_and_matches_the_reference():
    """The whole program (persistent tiles over 2 SMs, the producer's TMA pipeline, both consumer
    warpgroups' products and the epilogue's stores) executed on the CPU: two tiles of rows x two of
    features, four pipeline steps."""
    x, w = _case(256, 256, 256, 3)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = np.asarray(swiglu_matmul(xb, wb, interpret=_interpret_params()), np.float32)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(swiglu_matmul_reference(xb.astype(jnp.float32), wb.astype(jnp.float32)))
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max() / 64)


@pytest.mark.skipif(not HOPPER, reason="wgmma needs a Hopper GPU")
@pytest.mark.parametrize("t,e,f,cfg", [(512, 256, 384, Config()), (1024, 4096, 14336, Config()),
                                       (1024, 4096, 14336, Config(stages=4, snake_minor=0))])
def test_kernel_matches_the_float32_reference(t, e, f, cfg):
    x, w = _case(t, e, f, t + e)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    got = np.asarray(swiglu_matmul(xb, wb, cfg=cfg), np.float32)
    with jax.default_matmul_precision("highest"):
        want = np.asarray(swiglu_matmul_reference(xb.astype(jnp.float32), wb.astype(jnp.float32)))
    # one bf16 rounding of the output (2^-8 relative) plus float32 sums in another order
    np.testing.assert_allclose(got, want, rtol=2 ** -7, atol=2 ** -7 * np.abs(want).max() / 64)
