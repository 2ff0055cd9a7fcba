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


def test_swap_space_beyond_the_host_memory_names_the_setting(monkeypatch):
    from jaxserve.runner import kv_cache as kvc

    monkeypatch.setattr(kvc, "host_available_bytes", lambda: 3 * kvc.GIB)
    with pytest.raises(ValueError) as e:
        LLM(preemption_mode="swap", swap_space=8, warmup=False)
    msg = str(e.value)
    assert "swap_space=8 GiB" in msg and "3.0 GiB available" in msg and "recompute" in msg
    LLM(preemption_mode="swap", swap_space=2, warmup=False)  # within 90%: accepted


def test_unknown_engine_argument():
    with pytest.raises(TypeError, match="max_num_seqs"):
        LLM(max_num_seq=4)


@pytest.mark.parametrize("method", ["awq", "gptq", "int4"])
def test_quantization_that_cannot_apply_names_what_can(method):
    """int4 is no method; AWQ / GPTQ read checkpoints of their format, which the default GGUF
    model is not: each error names the method and the alternative (fp8)."""
    with pytest.raises(ValueError) as e:
        LLM(quantization=method, warmup=False)
    assert method in str(e.value) and "fp8" in str(e.value)


def test_rope_scaling_extends_the_context_and_bad_values_are_explained():
    """LLM(rope_scaling=...) as in vLLM's long-context recipe: the checkpoint's positions times
    the factor become the limit, the model runs with that scaling, and a length past it (or a bad
    scaling) names the fix."""
    import numpy as np

    from jaxserve.models.rope import rope_inv_freq

    with pytest.raises(ValueError, match="rope_scaling") as e:
        LLM(max_model_len=20000, warmup=False)  # SmolLM2: 8192 positions
    assert "'factor': 3" in str(e.value)
    for bad in ({"rope_type": "ntk"}, {"type": "dynamic"}, {"rope_type": "linear", "factor": 0.5}, "dynamic"):
        with pytest.raises(ValueError, match="rope_scaling"):
            LLM(rope_scaling=bad, warmup=False)
    sc = {"type": "dynamic", "factor": 2.0}
    llm = LLM(rope_scaling=sc, max_model_len=12000, max_num_seqs=2, warmup=False)
    arch = llm.llm_engine.model.arch
    assert arch.context_limit == 16384 and llm.llm_engine.max_model_len == 12000
    inv, _ = arch.rope()
    np.testing.assert_array_equal(inv, rope_inv_freq(arch.rope_theta, arch.head_dim, sc, 8192, 12000)[0])
    assert not np.allclose(inv, rope_inv_freq(arch.rope_theta, arch.head_dim, None, 8192, 12000)[0])
    out = llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
    with pytest.raises(ValueError, match="max_model_len=20000"):
        LLM(rope_scaling=sc, max_model_len=20000, warmup=False)


def test_weights_that_cannot_fit_are_refused_before_loading(monkeypatch, capsys):
    """A device whose allocator cannot hold the weights (faked: the CPU has no such limit) gets a
    ModelTooLargeError naming float8 weights and the devices that would fit, before any tensor is
    placed; the CLI prints it as an error line."""
    from jaxserve.cli import main
    from jaxserve.engine import llm_engine
    from jaxserve.models import footprint, llama
    from jaxserve.models.loader import DUMMY_SHAPES

    placed = []
    monkeypatch.setattr(llama, "init_dummy_params", lambda *a, **k: placed.append(1))
    arch = llama.LlamaConfig.from_hf_config(dict(DUMMY_SHAPES["tiny"], architectures=["LlamaForCausalLM"]))
    total = footprint.weight_bytes(llama.param_shapes(arch), "float32")
    fp8 = footprint.weight_bytes(llama.param_shapes(arch), "float32", "fp8")
    limit = total // 3
    monkeypatch.setattr(llm_engine, "_allocator_limit", lambda device: limit)
    with pytest.raises(footprint.ModelTooLargeError) as e:
        LLM(model="tiny", load_format="dummy", dtype="float32", warmup=False)
    msg = str(e.value)
    assert "at least 3 devices" in msg and f"{limit / 2**30:.1f} GiB the allocator may use" in msg
    assert f"quantization='fp8' ({fp8 / 2**30:.1f} GiB: " in msg
    assert not placed  # refused before the weights were made
    rc = main(["generate", "--model", "tiny", "--load-format", "dummy", "--dtype", "float32", "--prompt", "x"])
    assert rc == 2 and "error: the model's weights take" in capsys.readouterr().err
