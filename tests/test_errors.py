"""Clear errors users can hit, each naming the fix."""
import pytest

from jaxserve import LLM, SamplingParams


@pytest.mark.parametrize("kw,field", [
    (dict(top_p=0.0), "top_p"), (dict(max_tokens=-1), "max_tokens"), (dict(max_tokens=0), "max_tokens"),
    (dict(temperature=-0.5), "temperature"), (dict(n=0), "n"), (dict(top_k=-5), "top_k"),
    (dict(min_p=1.5), "min_p"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(min_tokens=10, max_tokens=5), "min_tokens"),
    (dict(logprobs=-1), "logprobs"), (dict(stop=[""]), "stop"),
])
def test_invalid_sampling_params(kw, field):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kw)


def test_unknown_model_path():
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        LLM("/nonexistent/model-dir-xyz")
    assert "/nonexistent/model-dir-xyz" in str(e.value)


def test_max_model_len_above_model_limit():
    with pytest.raises(ValueError, match="max_model_len"):
        LLM(max_model_len=10**6, warmup=False)


def test_kv_cache_too_small_names_the_setting():
    with pytest.raises(ValueError) as e:
        LLM(max_model_len=512, num_gpu_blocks_override=4, warmup=False)
    msg = str(e.value)
    assert "max_model_len" in msg and ("cpu_kv_cache_gib" in msg or "gpu_memory_utilization" in msg)


def test_unknown_engine_argument():
    with pytest.raises(TypeError, match="max_num_seqs"):
        LLM(max_num_seq=4)


@pytest.mark.parametrize("method", ["awq", "gptq", "int4"])
def test_unsupported_quantization_names_the_supported_one(method):
    with pytest.raises(ValueError) as e:
        LLM(quantization=method, warmup=False)
    assert method in str(e.value) and "fp8" in str(e.value)
