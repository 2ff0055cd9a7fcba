"""The weight-memory check before loading (models/footprint.py): the byte count against the
arrays a real load makes (bf16 and float8), and the refusal's advice on real model shapes."""
import jax
import jax.numpy as jnp
import pytest

from jaxserve.config import ModelConfig
from jaxserve.models import footprint, llama
from jaxserve.models.loader import DUMMY_SHAPES, load_model

GIB = 1 << 30


def _arch(name):
    return llama.LlamaConfig.from_hf_config(dict(DUMMY_SHAPES[name], architectures=["LlamaForCausalLM"]))


@pytest.mark.parametrize("quantization", [None, "fp8"])
def test_weight_bytes_is_what_loading_allocates(quantization):
    loaded = load_model(ModelConfig(model="tiny", load_format="dummy"), jnp.bfloat16, quantization=quantization)
    made = sum(x.nbytes for x in jax.tree_util.tree_leaves(loaded.params))
    assert footprint.weight_bytes(llama.param_shapes(loaded.arch), jnp.bfloat16, quantization) == made


def test_a_model_that_cannot_fit_is_refused_with_what_to_change():
    shapes = llama.param_shapes(_arch("llama-3-70b"))
    bf16, fp8 = (footprint.weight_bytes(shapes, jnp.bfloat16, q) for q in (None, "fp8"))
    assert 131 * GIB < bf16 < 132 * GIB and 67 * GIB < fp8 < 68 * GIB  # 70.6B parameters, bf16 embeddings
    limit = int(125.8 * GIB)  # an H200's allocator at gpu_memory_utilization=0.9
    kw = dict(device_limit=limit, where="NVIDIA H200", utilization=0.9, fp8_total=fp8)
    with pytest.raises(footprint.ModelTooLargeError) as e:
        footprint.check_weights_fit(bf16, devices=1, quantization=None, **kw)
    msg = str(e.value)
    assert "131" in msg and "125.8 GiB" in msg and "NVIDIA H200" in msg
    assert "quantization='fp8' (67.7 GiB: fits)" in msg and "at least 2 devices" in msg
    footprint.check_weights_fit(bf16, devices=2, quantization=None, **kw)  # split in two: fits
    footprint.check_weights_fit(fp8, devices=1, quantization="fp8", **kw)
    footprint.check_weights_fit(bf16, devices=1, quantization=None, **dict(kw, device_limit=None))  # CPU: no check
    with pytest.raises(footprint.ModelTooLargeError, match="needs 2 devices"):  # float8 alone is not enough
        footprint.check_weights_fit(bf16, devices=1, quantization=None, **dict(kw, device_limit=40 * GIB))
