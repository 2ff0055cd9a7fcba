"""HF architecture name -> model module (each module exposes LlamaConfig-like config, forward,
compute_logits, param_shapes, param_logical_axes, hf_to_params_name, init_dummy_params)."""
from __future__ import annotations

from types import ModuleType

from jaxserve.models import llama

_REGISTRY: dict[str, ModuleType] = {name: llama for name in llama.ARCHITECTURES}


def module_for_hf_config(cfg: dict) -> ModuleType:
    arch = (cfg.get("architectures") or ["LlamaForCausalLM"])[0]
    if arch not in _REGISTRY:
        raise ValueError(f"model architecture {arch!r} is not supported; supported: {sorted(_REGISTRY)}")
    return _REGISTRY[arch]


def model_module(arch_config) -> ModuleType:
    return _REGISTRY[arch_config.architecture]
