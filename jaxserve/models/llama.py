"""The Llama family (Llama 2/3/3.1, Mistral, Qwen2 with qkv bias, Qwen3 with q/k norm) as pure
functions over a params pytree.

Params (weights stored [in, out] so activations multiply on the left):
  embed       [V, E]
  layers      list of per-layer dicts (a list, not a stacked scan array: see DESIGN.md on scan
              temporaries), each:
    attn_norm [E]; wq [E, Hq*D]; wk, wv [E, Hkv*D]; (bq [Hq*D], bk, bv [Hkv*D])
    (q_norm, k_norm [D]); wo [Hq*D, E]; mlp_norm [E]; w_gate_up [E, 2, F] (index 0 = gate,
    1 = up: one GEMM of width 2F, and a tensor-parallel split of F keeps each rank's gate and up
    columns together); w_down [F, E]
  final_norm  [E]
  lm_head     [E, V]   (absent when the embeddings are tied)

The engine then fuses each layer's wq, wk, wv (and bq, bk, bv) into w_qkv [E, Hkv, G+2, D]
(fuse_qkv: per KV head, its G query heads, then its key and its value), so the attention
projection is one GEMM whose output splits into q, k, v with slices; a tensor-parallel split of
the Hkv axis keeps each rank's query heads with their KV head. Left separate, XLA's dot merger
fused the three dots itself in small steps by concatenating the weights inside every step (a
50 MB copy per layer per step for Llama-3-8B).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.models.attention import paged_attention
from jaxserve.models.quant import linear as _linear
from jaxserve.models.rope import apply_rope, cos_sin, rope_inv_freq

ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class LlamaConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    # rope scaling as a hashable tuple of (key, value) pairs (the HF dict, frozen)
    rope_scaling: Optional[tuple] = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # Qwen2: biases on q/k/v
    qk_norm: bool = False  # Qwen3: RMSNorm on q and k per head
    sliding_window: Optional[int] = None  # Mistral
    architecture: str = "LlamaForCausalLM"
    # The rope table is fixed for the engine's max_model_len (matters for "dynamic" only).
    max_model_len: Optional[int] = None

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")

    @property
    def rope_scaling_dict(self) -> Optional[dict]:
        return dict(self.rope_scaling) if self.rope_scaling else None

    @property
    def context_limit(self) -> int:
        """The longest context the model's positions support: max_position_embeddings, times the
        factor of a linear / dynamic rope scaling (yarn: of its original length), as vLLM derives
        it; a llama3 scaling's checkpoint already states its extended length."""
        sc = self.rope_scaling_dict or {}
        kind = sc.get("rope_type", sc.get("type"))
        if kind in ("linear", "dynamic") and sc.get("factor"):
            return int(self.max_position_embeddings * float(sc["factor"]))
        if kind == "yarn" and sc.get("factor"):
            orig = sc.get("original_max_position_embeddings") or self.max_position_embeddings
            return max(self.max_position_embeddings, int(orig * float(sc["factor"])))
        return self.max_position_embeddings

    @classmethod
    def from_hf_config(cls, c: dict) -> "LlamaConfig":
        arch = (c.get("architectures") or ["LlamaForCausalLM"])[0]
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        scaling = c.get("rope_scaling") or c.get("rope_parameters")
        if scaling and scaling.get("rope_type", scaling.get("type")) in (None, "default"):
            theta_from_params = scaling.get("rope_theta")
            scaling = None
        else:
            theta_from_params = scaling.get("rope_theta") if scaling else None
        theta = c.get("rope_theta") or theta_from_params or 10000.0
        if scaling:
            scaling = {k: v for k, v in scaling.items() if k != "rope_theta"}
        sw = c.get("sliding_window") if c.get("use_sliding_window", arch == "MistralForCausalLM") else None
        return cls(
            vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], intermediate_size=c["intermediate_size"],
            num_layers=c["num_hidden_layers"], num_heads=heads,
            num_kv_heads=c.get("num_key_value_heads") or heads, head_dim=head_dim,
            rms_norm_eps=c.get("rms_norm_eps", 1e-6), rope_theta=float(theta),
            rope_scaling=_freeze(scaling), max_position_embeddings=c.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(c.get("tie_word_embeddings", False)),
            attention_bias=bool(c.get("attention_bias", arch == "Qwen2ForCausalLM")),
            qk_norm=arch == "Qwen3ForCausalLM", sliding_window=sw, architecture=arch)

    def rope(self):
        return rope_inv_freq(self.rope_theta, self.head_dim, self.rope_scaling_dict,
                             self.max_position_embeddings, self.max_model_len or self.max_position_embeddings)


def _freeze(d):
    if d is None:
        return None
    return tuple(sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in d.items()))


def param_logical_axes(cfg: LlamaConfig) -> dict:
    layer = {"attn_norm": ("norm",), "wq": ("embed", "q_heads"), "wk": ("embed", "kv_heads"),
             "wv": ("embed", "kv_heads"), "wo": ("heads_in", "embed"), "mlp_norm": ("norm",),
             "w_gate_up": ("embed", "gate_up", "mlp"), "w_down": ("mlp_in", "embed")}
    if cfg.attention_bias:
        layer.update(bq=("q_heads",), bk=("kv_heads",), bv=("kv_heads",))
    if cfg.qk_norm:
        layer.update(q_norm=("head_dim",), k_norm=("head_dim",))
    axes = {"embed": ("vocab", "embed"), "layers": [dict(layer) for _ in range(cfg.num_layers)],
            "final_norm": ("norm",)}
    if not cfg.tie_word_embeddings:
        axes["lm_head"] = ("embed", "vocab")
    return axes


def param_shapes(cfg: LlamaConfig) -> dict:
    E, F, D = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    hq, hkv = cfg.num_heads * D, cfg.num_kv_heads * D
    layer = {"attn_norm": (E,), "wq": (E, hq), "wk": (E, hkv), "wv": (E, hkv), "wo": (hq, E),
             "mlp_norm": (E,), "w_gate_up": (E, 2, F), "w_down": (F, E)}
    if cfg.attention_bias:
        layer.update(bq=(hq,), bk=(hkv,), bv=(hkv,))
    if cfg.qk_norm:
        layer.update(q_norm=(D,), k_norm=(D,))
    shapes = {"embed": (cfg.vocab_size, E), "layers": [dict(layer) for _ in range(cfg.num_layers)],
              "final_norm": (E,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (E, cfg.vocab_size)
    return shapes


def rms_norm(x, w, eps):
    """x [..., E] -> same dtype; statistics in float32 as HF does."""
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return (w.astype(jnp.float32) * xf).astype(x.dtype)


def _tp_mesh(backend):
    """The tensor-parallel mesh of the attention backend, if its "model" axis splits the weights:
    4-bit products run their kernel per shard there (XLA's partitioner cannot split a kernel call;
    left to it, it would gather the whole weight on every device)."""
    mesh = getattr(backend, "mesh", None)
    return mesh if mesh is not None and mesh.shape.get("model", 1) > 1 else None


def _layer(lp, cfg: LlamaConfig, x, cos, sin, kv, md, backend):
    T = x.shape[0]
    D = cfg.head_dim
    mesh = _tp_mesh(backend)
    col = functools.partial(_linear, mesh=mesh, split="col")  # output columns split (q, k, v, gate+up)
    row = functools.partial(_linear, mesh=mesh, split="row")  # inputs split (o, down)
    h = rms_norm(x, lp["attn_norm"], cfg.rms_norm_eps)
    if "w_qkv" in lp:  # fused (fuse_qkv)
        qkv = col(h, lp["w_qkv"])  # [T, Hkv, G+2, D]
        if cfg.attention_bias:
            qkv = qkv + lp["b_qkv"]
        g = qkv.shape[2] - 2
        q = qkv[:, :, :g].reshape(T, -1, D)  # [T, Hq, D]: query head j*G + i is (KV head j, i)
        k, v = qkv[:, :, g], qkv[:, :, g + 1]  # [T, Hkv, D]
    else:
        q = col(h, lp["wq"])  # [T, Hq*D]
        k = col(h, lp["wk"])  # [T, Hkv*D]
        v = col(h, lp["wv"])
        if cfg.attention_bias:
            q, k, v = q + lp["bq"], k + lp["bk"], v + lp["bv"]
        q = q.reshape(T, -1, D)  # [T, Hq, D]
        k = k.reshape(T, -1, D)  # [T, Hkv, D]
        v = v.reshape(T, -1, D)
    if cfg.qk_norm:
        q = rms_norm(q, lp["q_norm"], cfg.rms_norm_eps)
        k = rms_norm(k, lp["k_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, cos, sin)
    k = apply_rope(k, cos, sin)
    o, kv = paged_attention(q, k, v, kv, md, backend=backend, sm_scale=D ** -0.5,
                            sliding_window=cfg.sliding_window)
    x = x + row(o.reshape(T, -1), lp["wo"])
    h = rms_norm(x, lp["mlp_norm"], cfg.rms_norm_eps)
    x = x + _mlp(lp, h, col, row)
    return x, kv


def _mlp(lp, h, col=None, row=None):
    """h [T, E] -> [T, E]. gate and up are one dot of width 2F (a batch-1 decode GEMV of both
    weights at once runs closer to peak memory bandwidth than two GEMVs of F). Weights are
    [in, out] arrays, float8 or 4-bit ones (models/quant.py, models/int4.py)."""
    col, row = col or _linear, row or _linear
    gu = col(h, lp["w_gate_up"])  # [T, 2, F]
    return row(jax.nn.silu(gu[:, 0]) * gu[:, 1], lp["w_down"])


def forward(params, cfg: LlamaConfig, token_ids, positions, kv_caches, md, *, attn_backend: str,
            layers: Optional[range] = None, hidden=None):
    """token_ids, positions [T] -> (hidden [T, E] after the final norm, new kv_caches).

    kv_caches: list per layer of [2, num_blocks, block_size, Hkv, D]. `layers`/`hidden` let a
    pipeline stage run a slice of the layers on the previous stage's hidden state: then
    params["layers"] and kv_caches hold only that slice, the embedding is skipped when `hidden` is
    given, and the final norm is applied only by the stage owning the last layer.
    """
    layers = layers if layers is not None else range(cfg.num_layers)
    x = params["embed"][token_ids] if hidden is None else hidden  # [T, E]
    inv_freq, att = cfg.rope()
    cos, sin = cos_sin(positions, inv_freq, att)
    new = list(kv_caches)
    for j in range(len(layers)):
        x, new[j] = _layer(params["layers"][j], cfg, x, cos, sin, kv_caches[j], md, attn_backend)
    if layers.stop == cfg.num_layers:
        x = rms_norm(x, params["final_norm"], cfg.rms_norm_eps)
    return x, new


def compute_logits(params, cfg: LlamaConfig, hidden):
    """hidden [N, E] -> logits [N, V] float32."""
    w = params["embed"].T if cfg.tie_word_embeddings else params["lm_head"]
    return jnp.dot(hidden, w, preferred_element_type=jnp.float32)


def with_max_model_len(cfg: LlamaConfig, max_model_len: int) -> LlamaConfig:
    return dataclasses.replace(cfg, max_model_len=max_model_len)


class HFTarget(NamedTuple):
    """Where one HF checkpoint tensor goes in params."""
    path: tuple  # the params leaf, e.g. ("layers", 3, "wq")
    transpose: bool  # HF stores [out, in], params [in, out]
    # For a leaf stacked from several HF tensors (w_gate_up [E, 2, F]): the index this tensor fills
    # along `axis` of the leaf (after the transpose); None for a leaf that is one HF tensor.
    part: Optional[int] = None
    axis: int = 0


_LAYER_TABLE = {  # HF name inside model.layers.{i}. -> (params key, transpose, stacked part)
    "input_layernorm.weight": ("attn_norm", False, None),
    "post_attention_layernorm.weight": ("mlp_norm", False, None),
    "self_attn.q_proj.weight": ("wq", True, None), "self_attn.k_proj.weight": ("wk", True, None),
    "self_attn.v_proj.weight": ("wv", True, None), "self_attn.o_proj.weight": ("wo", True, None),
    "self_attn.q_proj.bias": ("bq", False, None), "self_attn.k_proj.bias": ("bk", False, None),
    "self_attn.v_proj.bias": ("bv", False, None), "self_attn.q_norm.weight": ("q_norm", False, None),
    "self_attn.k_norm.weight": ("k_norm", False, None),
    "mlp.gate_proj.weight": ("w_gate_up", True, 0), "mlp.up_proj.weight": ("w_gate_up", True, 1),
    "mlp.down_proj.weight": ("w_down", True, None),
}


def hf_to_params_name(name: str) -> Optional[HFTarget]:
    """HF safetensors tensor name -> where it goes in params, or None when unused. gate_proj and
    up_proj [F, E] both land in w_gate_up [E, 2, F], at index 0 and 1 of axis 1."""
    if name == "model.embed_tokens.weight":
        return HFTarget(("embed",), False)
    if name == "model.norm.weight":
        return HFTarget(("final_norm",), False)
    if name == "lm_head.weight":
        return HFTarget(("lm_head",), True)
    parts = name.split(".")
    if len(parts) < 5 or parts[0] != "model" or parts[1] != "layers":
        return None
    rest = ".".join(parts[3:])
    if rest not in _LAYER_TABLE:
        return None
    key, tr, part = _LAYER_TABLE[rest]
    if part is None:
        return HFTarget(("layers", int(parts[2]), key), tr)
    return HFTarget(("layers", int(parts[2]), key), tr, part, axis=1)  # [E, 2, F]


@functools.lru_cache(maxsize=None)
def _dummy_generator(shape, dtype, ones, sharding):
    def gen(key):
        if ones:
            return jnp.ones(shape, dtype)
        return (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(dtype)
    return jax.jit(gen, out_shardings=sharding)


def fuse_qkv(params: dict, cfg: LlamaConfig, free: bool = False) -> dict:
    """params with each layer's wq [E, Hq*D], wk, wv [E, Hkv*D] (and bq, bk, bv) replaced by
    w_qkv [E, Hkv, G+2, D] (and b_qkv [Hkv, G+2, D]), layer by layer so the device holds one
    layer's projections twice at most. Each fused array keeps its layer's placement: a
    tensor-parallel split of the query / KV heads becomes a split of the Hkv axis (the same heads
    per rank). Float8 weights (models/quant.py) stay separate: fused along their output channels
    they ran 128 / 128 3% slower in an A/B on an H200 (docs/ARCHITECTURE.md). 4-bit weights
    (models/int4.py) on one device are fused member by member ({"qw", "s", "z"}, each [rows, Hq*D]
    -> [rows, Hkv, G+2, D]): one product of N = (Hq + 2 Hkv) * D instead of three narrow ones
    (Llama-3-8B: a 6,144-column product took 9.5-11.3 us on an H200 where the 4,096-column q alone
    took 7.7, fourteenth session); on a mesh they stay separate (int4's per-shard product splits the
    last output axis, not Hkv). free (the engine): each layer's separate arrays are deleted once
    fused, so the device holds one layer's projections twice at most and the next layer's fused
    array can take the place they leave (else all of them stay until the caller drops the old tree,
    and leave holes between the resident arrays)."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from jaxserve.models import int4
    from jaxserve.models.quant import is_quantized

    D, hkv = cfg.head_dim, cfg.num_kv_heads
    g = cfg.num_heads // hkv
    fuse_w = jax.jit(lambda q, k, v: jnp.concatenate(  # rows: E, or E/8 words and E/G groups (4-bit)
        [q.reshape(q.shape[0], hkv, g, D), k.reshape(k.shape[0], hkv, 1, D), v.reshape(v.shape[0], hkv, 1, D)],
        axis=2))
    fuse_b = jax.jit(lambda q, k, v: jnp.concatenate(
        [q.reshape(hkv, g, D), k.reshape(hkv, 1, D), v.reshape(hkv, 1, D)], axis=1))
    layers = []
    for lp in params["layers"]:
        if "wq" in lp and int4.is_int4(lp["wq"]) and "qw" in lp["wq"] and len(lp["wq"]["qw"].sharding.device_set) == 1:
            lp = dict(lp)
            q, k, v = lp.pop("wq"), lp.pop("wk"), lp.pop("wv")
            lp["w_qkv"] = {m: fuse_w(q[m], k[m], v[m]) for m in ("qw", "s", "z")}
            used = [t[m] for t in (q, k, v) for m in ("qw", "s", "z")]
            if "bq" in lp:
                bias = lp.pop("bq"), lp.pop("bk"), lp.pop("bv")
                lp["b_qkv"] = fuse_b(*bias)
                used += bias
            _delete(used, free)
            layers.append(lp)
            continue
        if "wq" not in lp or is_quantized(lp["wq"]):
            layers.append(lp)
            continue
        lp = dict(lp)
        sh = lp["wq"].sharding
        out = None
        if isinstance(sh, NamedSharding) and len(sh.spec) == 2:  # [E, heads] -> [E, Hkv, G+2, D]
            out = NamedSharding(sh.mesh, P(sh.spec[0], sh.spec[1], None, None))
        used = [lp.pop("wq"), lp.pop("wk"), lp.pop("wv")]
        w = fuse_w(*used)
        lp["w_qkv"] = jax.device_put(w, out) if out is not None else w
        if "bq" in lp:
            bias = lp.pop("bq"), lp.pop("bk"), lp.pop("bv")
            b = fuse_b(*bias)
            lp["b_qkv"] = (jax.device_put(b, NamedSharding(sh.mesh, P(sh.spec[1], None, None)))
                           if out is not None else b)
            used += bias
        _delete(used, free)
        layers.append(lp)
    return dict(params, layers=layers)


def _delete(arrays, free: bool) -> None:
    """fuse_qkv's inputs once fused (free): the runtime keeps each until the fusion reading it is done."""
    for a in arrays if free else ():
        a.delete()


def init_dummy_params(cfg: LlamaConfig, dtype, seed: int = 0, shardings=None, on_placed=None) -> dict:
    """Random weights built on the device, tensor by tensor (for benchmarks without a checkpoint).
    Scaled like a trained model's (std 0.02, unit norms) so activations stay finite. Each tensor is
    generated directly in its shards (`shardings`), so no device ever holds a whole sharded tensor;
    one compiled generator per distinct (shape, sharding), which the layers share.
    on_placed(path, array) -> what the leaf keeps, as in loader.build_params (path like
    ("layers", 3, "w_down"))."""
    shapes = param_shapes(cfg)
    is_shape = lambda x: isinstance(x, tuple)  # noqa: E731
    flat, tree = jax.tree_util.tree_flatten_with_path(shapes, is_leaf=is_shape)
    shard_leaves = ([_lookup_path(shardings, path) for path, _ in flat] if shardings is not None
                    else [None] * len(flat))
    out = []
    for idx, ((path, shape), sh) in enumerate(zip(flat, shard_leaves)):
        ones = "norm" in str(path[-1])
        gen = _dummy_generator(tuple(shape), jnp.dtype(dtype), ones, sh)
        w = gen(jax.random.fold_in(jax.random.PRNGKey(seed), idx))
        if on_placed is not None:
            w = on_placed(tuple(k.key if hasattr(k, "key") else k.idx for k in path), w)
        out.append(w)
    return jax.tree_util.tree_unflatten(tree, out)


def _lookup_path(tree, path):
    node = tree
    for k in path:
        node = node[k.key if hasattr(k, "key") else k.idx]
    return node


def num_params(cfg: LlamaConfig) -> int:
    return int(sum(np.prod(s) for s in jax.tree_util.tree_leaves(param_shapes(cfg),
                                                                  is_leaf=lambda x: isinstance(x, tuple))))
