"""The Llama family on tiny random HF checkpoints (written with save_pretrained, single and
sharded safetensors) against HF transformers' own forward, float32."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxserve.config import ModelConfig
from jaxserve.models import llama
from jaxserve.models.attention import AttentionMetadata
from jaxserve.models.loader import build_params, load_model
from jaxserve.models.rope import rope_inv_freq

BASE = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=10000.0)

CASES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM", dict(tie_word_embeddings=True)),
    "llama_linear": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama_dynamic": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "llama3": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "llama_yarn": ("LlamaConfig", "LlamaForCausalLM", dict(rope_scaling={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64})),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=None)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=16)),
}


def _save(tmp_path, case, shard=False):
    import transformers

    cfg_cls, model_cls, extra = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():  # make biases / norms non-trivial so they are really tested
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    d = tmp_path / case
    model.save_pretrained(d, safe_serialization=True, max_shard_size="60KB" if shard else "10GB")
    return model, str(d)


def _run(params, arch, ids):
    T = len(ids)
    bs, nb = 16, 8
    kv = [jnp.zeros((2, nb, bs, arch.num_kv_heads, arch.head_dim), jnp.float32) for _ in range(arch.num_layers)]
    blocks = [3, 1, 5, 2, 7]  # shuffled block table
    slots = np.array([blocks[p // bs] * bs + p % bs for p in range(T)], np.int32)
    md = AttentionMetadata(slot_mapping=jnp.asarray(slots),
                           block_tables=jnp.asarray([blocks + [0] * 3], jnp.int32),
                           seq_lens=jnp.asarray([T], jnp.int32), query_start_loc=jnp.asarray([0, T], jnp.int32))
    h, _ = llama.forward(params, arch, jnp.asarray(ids, jnp.int32), jnp.arange(T, dtype=jnp.int32), kv, md,
                         attn_backend="reference")
    return np.asarray(llama.compute_logits(params, arch, h))


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(tmp_path, case):
    model, d = _save(tmp_path, case, shard=case == "llama")
    if case == "llama":
        assert os.path.isfile(os.path.join(d, "model.safetensors.index.json"))  # really sharded
    from jaxserve.models.loader import _iter_safetensors, _safetensors_files

    with open(os.path.join(d, "config.json")) as f:
        arch = llama.LlamaConfig.from_hf_config(json.load(f))
    params = build_params(arch, _iter_safetensors(_safetensors_files(d)), jnp.float32)
    ids = list(np.random.default_rng(1).integers(0, 256, 70))
    got = _run(params, arch, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel
    # The engine's layout: q/k/v projections (and biases) fused per KV head into one weight.
    fused = llama.fuse_qkv(params, arch)
    lp = fused["layers"][0]
    assert "w_qkv" in lp and not {"wq", "wk", "wv", "bq", "bk", "bv"} & set(lp)
    g = arch.num_heads // arch.num_kv_heads
    assert lp["w_qkv"].shape == (arch.hidden_size, arch.num_kv_heads, g + 2, arch.head_dim)
    # KV head 1's key columns are wk's second head, exactly
    D = arch.head_dim
    np.testing.assert_array_equal(np.asarray(lp["w_qkv"][:, 1, g]), np.asarray(params["layers"][0]["wk"][:, D:2 * D]))
    got_fused = _run(fused, arch, ids)
    rel = np.linalg.norm(got_fused - ref) / np.linalg.norm(ref)
    assert rel < 1e-4, rel


def test_fp8_quantized_while_loading(tmp_path):
    """quantization="fp8" quantizes each projection as the loader places it: the same float8
    weights as quantizing the loaded model afterwards (exactly), for a checkpoint (with biases:
    qwen2) and for dummy weights; the float8 model stays close to the checkpoint's float32 one."""
    from jaxserve.models import quant
    from jaxserve.models.loader import _iter_safetensors, _safetensors_files

    model, d = _save(tmp_path, "qwen2")
    with open(os.path.join(d, "config.json")) as f:
        arch = llama.LlamaConfig.from_hf_config(json.load(f))
    after = quant.quantize_params(build_params(arch, _iter_safetensors(_safetensors_files(d)), jnp.float32), "fp8")
    for mc, want in ((ModelConfig(model=d), after),
                     (ModelConfig(model="tiny", load_format="dummy"), None)):
        loaded = load_model(mc, jnp.float32, quantization="fp8")
        if want is None:  # dummy weights: the same generator without quantization, then quantized
            want = quant.quantize_params(load_model(mc, jnp.float32).params, "fp8")
        assert jax.tree_util.tree_structure(loaded.params) == jax.tree_util.tree_structure(want)
        for a, b in zip(jax.tree_util.tree_leaves(loaded.params), jax.tree_util.tree_leaves(want)):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))
    lp = after["layers"][0]
    assert quant.is_quantized(lp["wq"]) and quant.is_quantized(lp["w_down"]) and not quant.is_quantized(lp["bq"])
    assert llama.fuse_qkv(after, arch)["layers"][0]["wq"] is lp["wq"]  # float8 q / k / v stay separate
    ids = list(np.random.default_rng(1).integers(0, 256, 40))
    got = _run(after, arch, ids)
    with torch.no_grad():
        ref = model(torch.tensor([ids])).logits[0].numpy()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.1


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_runs(tmp_path, dtype):
    model, d = _save(tmp_path, "qwen2")
    with open(os.path.join(d, "config.json")) as f:
        arch = llama.LlamaConfig.from_hf_config(json.load(f))
    from jaxserve.models.loader import _iter_safetensors, _safetensors_files

    params = build_params(arch, _iter_safetensors(_safetensors_files(d)), dtype)
    got = _run(params, arch, list(range(40)))
    with torch.no_grad():
        ref = model(torch.tensor([list(range(40))])).logits[0].numpy()
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 5e-2


@pytest.mark.parametrize("case", ["llama_linear", "llama3", "llama_yarn"])
def test_rope_inv_freq_matches_transformers(case):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg_cls, _, extra = CASES[case]
    cfg = getattr(transformers, cfg_cls)(**BASE, **extra)
    rs = extra["rope_scaling"]
    inv_ref, att_ref = ROPE_INIT_FUNCTIONS[rs["rope_type"]](cfg, "cpu")
    inv, att = rope_inv_freq(10000.0, 16, rs, 256, 256)
    np.testing.assert_allclose(inv, inv_ref.numpy(), rtol=1e-5)
    assert abs(att - att_ref) < 1e-6


def test_hf_cache_repo_id_offline(tmp_path, monkeypatch):
    _, d = _save(tmp_path, "llama")
    snap = tmp_path / "hub" / "models--acme--tiny-llama" / "snapshots" / "abc123"
    snap.parent.mkdir(parents=True)
    os.rename(d, snap)
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-llama" / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    from jaxserve.models.loader import resolve

    assert resolve(ModelConfig(model="acme/tiny-llama")) == ("hf_dir", str(snap))


def test_unknown_repo_id_names_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="Hugging Face cache"):
        load_model(ModelConfig(model="acme/does-not-exist"), jnp.float32)


def test_gguf_unpermute_inverts_llama_cpp_permute():
    from jaxserve.models.gguf_reader import unpermute_qk

    n_head, d, e = 3, 8, 5
    w = np.random.default_rng(0).standard_normal((n_head * d, e))
    # llama.cpp's convert permutation
    permuted = w.reshape(n_head, 2, d // 2, e).swapaxes(1, 2).reshape(w.shape)
    np.testing.assert_array_equal(unpermute_qk(permuted, n_head), w)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gate_up_stacked_from_the_hf_projections(tmp_path, dtype):
    """w_gate_up [E, 2, F] holds gate_proj.T at index 0 and up_proj.T at index 1, exactly (cast
    like every other tensor), also when the two sit in different safetensors shards."""
    from jaxserve.models.loader import _iter_safetensors, _safetensors_files

    model, d = _save(tmp_path, "llama", shard=True)
    with open(os.path.join(d, "config.json")) as f:
        arch = llama.LlamaConfig.from_hf_config(json.load(f))
    params = build_params(arch, _iter_safetensors(_safetensors_files(d)), dtype)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    for i in range(arch.num_layers):
        gate, up = sd[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"model.layers.{i}.mlp.up_proj.weight"]
        want = np.stack([gate.T, up.T], axis=1).astype(jnp.dtype(dtype))  # [E, 2, F]
        got = params["layers"][i]["w_gate_up"]
        assert got.shape == (64, 2, 96) and got.dtype == jnp.dtype(dtype)
        np.testing.assert_array_equal(np.asarray(got), want)


@pytest.mark.parametrize("drop", ["up_proj", "gate_proj"])
def test_checkpoint_missing_half_of_gate_up_is_named(tmp_path, drop):
    from jaxserve.models.loader import _iter_safetensors, _safetensors_files

    _, d = _save(tmp_path, "llama")
    with open(os.path.join(d, "config.json")) as f:
        arch = llama.LlamaConfig.from_hf_config(json.load(f))
    tensors = ((n, a) for n, a in _iter_safetensors(_safetensors_files(d)) if n != f"model.layers.1.mlp.{drop}.weight")
    kept = "up_proj" if drop == "gate_proj" else "gate_proj"
    with pytest.raises(ValueError, match=rf"missing 1 tensors.*\['layers'\]\[1\]\['w_gate_up'\] has only "
                                         rf"model\.layers\.1\.mlp\.{kept}\.weight, its other part is missing"):
        build_params(arch, tensors, jnp.float32)


def test_mlp_gate_and_up_are_one_dot():
    """The compiled MLP has two dots: gate+up with N = 2F, and down (XLA does not merge two
    separate gate/up dots on its own, so the layout must)."""
    import re

    import jax

    E, F = 64, 96
    lp = {"w_gate_up": jnp.zeros((E, 2, F), jnp.float32), "w_down": jnp.zeros((F, E), jnp.float32)}
    for T in (1, 8):
        hlo = jax.jit(llama._mlp).lower(lp, jnp.zeros((T, E), jnp.float32)).compile().as_text()
        dots = re.findall(r"= f32\[([\d,]+)\]\{[\d,]*\} dot\(", hlo)
        assert sorted(dots) == sorted([f"{T},{2 * F}", f"{T},{E}"]), (T, dots)
