"""GGUF files (llama.cpp) -> HF-style config dict and dequantized tensors in HF layout.

llama.cpp's converter permutes the rows of the Q and K projections (interleaved rotary halves);
`unpermute_qk` undoes it so the weights match HF's neox-style rotary layout.
"""
from __future__ import annotations

import os
from typing import Iterator

import numpy as np

from jaxserve.models.gguf_file import GGUFFile, dequantize

_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
         "qwen3": "Qwen3ForCausalLM"}

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias", "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight", "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_down.weight": "mlp.down_proj.weight",
}


_READERS: dict = {}  # (path, size, mtime) -> parsed reader, the few most recent
_KEEP = 4


def open_gguf(path: str) -> GGUFFile:
    """The parsed file (gguf_file.GGUFFile: read-only views of the memory-mapped file), shared within
    the process, so that a notebook or a test suite that builds several engines from one file reads
    its header once. A file whose size or modification time changed is parsed again."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    reader = _READERS.pop(key, None)
    if reader is None:
        reader = GGUFFile(path)
    _READERS[key] = reader  # most recent last
    while len(_READERS) > _KEEP:
        _READERS.pop(next(iter(_READERS)))
    return reader


def _field(reader: GGUFFile, key, default=None):
    return reader.metadata.get(key, default)


def hf_config(reader) -> dict:
    arch_name = _field(reader, "general.architecture", "llama")
    if arch_name not in _ARCH:
        raise ValueError(f"GGUF architecture {arch_name!r} is not supported; supported: {sorted(_ARCH)}")
    a = arch_name
    heads = int(_field(reader, f"{a}.attention.head_count"))
    hidden = int(_field(reader, f"{a}.embedding_length"))
    tensor_names = reader.tensor_names
    vocab = _field(reader, f"{a}.vocab_size")
    if vocab is None:
        vocab = len(_field(reader, "tokenizer.ggml.tokens", ()))
        if not vocab:
            raise ValueError(f"{reader.path} has neither {a}.vocab_size nor a tokenizer.ggml.tokens list")
    cfg = {
        "architectures": [_ARCH[a]],
        "vocab_size": int(vocab),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{a}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{a}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{a}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{a}.attention.key_length", hidden // heads)),
        "rms_norm_eps": float(_field(reader, f"{a}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(_field(reader, f"{a}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(_field(reader, f"{a}.context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "attention_bias": "blk.0.attn_q.bias" in tensor_names,
    }
    st = _field(reader, f"{a}.rope.scaling.type")
    if st and st != "none":
        cfg["rope_scaling"] = {"rope_type": st, "factor": float(_field(reader, f"{a}.rope.scaling.factor", 1.0)),
                               "original_max_position_embeddings":
                                   int(_field(reader, f"{a}.rope.scaling.original_context_length",
                                              cfg["max_position_embeddings"]))}
    return cfg


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's permute: rows [n_heads, 2, D/2] interleaved -> [n_heads, D/2, 2]."""
    rows = w.shape[0]
    return (w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape))


def iter_tensors(reader, cfg: dict) -> Iterator[tuple[str, np.ndarray]]:
    """Yields (HF tensor name, float32 array in HF layout [out, in]) one tensor at a time."""
    permute = cfg["architectures"][0] in ("LlamaForCausalLM", "MistralForCausalLM")
    for t in reader.tensors:
        name = t.name
        if name == "token_embd.weight":
            hf = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            hf = "model.norm.weight"
        elif name == "output.weight":
            hf = "lm_head.weight"
        elif name.startswith("blk."):
            _, i, rest = name.split(".", 2)
            if rest not in _LAYER_NAMES:
                continue
            hf = f"model.layers.{i}.{_LAYER_NAMES[rest]}"
        else:
            continue
        arr = dequantize(t)
        if permute and rest_is(name, "attn_q.weight", "attn_q.bias"):
            arr = unpermute_qk(arr, cfg["num_attention_heads"])
        elif permute and rest_is(name, "attn_k.weight", "attn_k.bias"):
            arr = unpermute_qk(arr, cfg["num_key_value_heads"])
        yield hf, arr


def rest_is(name: str, *suffixes: str) -> bool:
    return any(name.endswith("." + s) for s in suffixes)


def chat_template(reader):
    return _field(reader, "tokenizer.chat_template")


def eos_ids(reader) -> list[int]:
    ids = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        v = _field(reader, key)
        if v is not None:
            ids.append(int(v))
    return sorted(set(ids))
