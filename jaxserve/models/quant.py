"""8-bit floating-point weights (`quantization="fp8"`, vLLM's `--quantization fp8`).

A bf16/fp16 checkpoint is quantized on the device while it loads (LeafQuantizer: each tensor as
it is placed, so the 16-bit model never sits on the device whole): every projection weight of a
layer (q, k, v, o, gate+up, down) becomes float8 e4m3 with one float32 scale per output channel
(scale = max |w| over the input dimension / 448). Activations are quantized per token at run
time (dynamic scales), so the matrix units run float8 x float8 with float32 accumulation: on
Hopper twice the bf16 FLOP rate. Steps of at most WEIGHT_ONLY_MAX_ROWS tokens (small decode
batches, bound by the weight bytes) keep 16-bit activations and widen the weight in the GEMM:
half the bytes of bf16 weights, no activation rounding.
Embeddings, the LM head and norms stay in the model dtype.

Stored layout: a quantized weight is a dict {"q": [N, K] float8 (output channels first, the
layout the GPU's float8 GEMM takes without a transpose), "s": [N] float32}; the fused gate+up
[E, 2, F] becomes q [2, F, E], s [2, F]. `linear` takes either form, so the model code is the
same for both.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxserve.models import int4

FP8 = jnp.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
QUANTIZED = ("wq", "wk", "wv", "wo", "w_gate_up", "w_down")  # the layer weights that are quantized
METHODS = ("fp8", "awq", "gptq")  # awq / gptq: 4-bit weights in groups (models/int4.py)
# Up to this many rows (tokens of a step) `linear` keeps activations in 16 bits (weight-only float8):
# a GEMM of M rows does 2M FLOPs per weight byte, under the H100/H200 ridge (~200) for M <= 64.
WEIGHT_ONLY_MAX_ROWS = 64


def quantize_weight(w):
    """w [K, ...out] (input dimension first, as the model stores it) -> {"q": [...out, K] float8,
    "s": [...out] float32}, one scale per output channel."""
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=0)  # [...out]
    s = jnp.maximum(amax, 1e-12) / FP8_MAX
    q = (jnp.moveaxis(wf, 0, -1) / s[..., None]).astype(FP8)  # |values| <= 448: no clipping needed
    return {"q": q, "s": s}


def dequantize(qw):
    """{"q": [...out, K], "s": [...out]} -> [K, ...out] float32 (tests and reference)."""
    return jnp.moveaxis(qw["q"].astype(jnp.float32) * qw["s"][..., None], -1, 0)


def is_quantized(w) -> bool:
    return isinstance(w, dict)


def linear(x, w, *, weight_only: Optional[bool] = None, mesh=None, split: Optional[str] = None):
    """x [T, K] @ w -> [T, N...] in x's dtype; w is [K, N...], a float8 weight or a 4-bit one
    (int4.linear). weight_only (float8): None picks by rows (at most WEIGHT_ONLY_MAX_ROWS:
    weight-only); True / False force a path (benchmarks). mesh / split (4-bit on a tensor-parallel
    mesh): how the weight is split, so its kernel runs per shard (int4.linear)."""
    if not is_quantized(w):
        if w.ndim == 2:
            return x @ w
        return jnp.einsum("tk,k...->t...", x, w)
    if int4.is_int4(w):
        return int4.linear(x, w, mesh=mesh, split=split)
    q, s = w["q"], w["s"]
    q2, s2 = q.reshape(-1, q.shape[-1]), s.reshape(-1)  # [N, K], [N]
    if weight_only is None:
        weight_only = x.shape[0] <= WEIGHT_ONLY_MAX_ROWS
    y = _weight_only(x, q2, s2) if weight_only else _fp8_x_fp8(x, q2, s2)
    return y.reshape((x.shape[0],) + q.shape[:-1])


def _weight_only(x, q2, s2):
    """A decode of a few rows reads the weights and does little else: keep the activations in 16
    bits and widen the float8 weight inside the GEMM (XLA fuses the convert into its GEMV / Triton
    kernel), so the float8 bytes are what moves. The float8 x float8 cuBLAS path ran batch-1
    decode no faster than bf16 weights on an H200 (231-239 vs 229 tok/s)."""
    y = jax.lax.dot_general(x, q2.astype(x.dtype), (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    return (y * s2[None, :]).astype(x.dtype)


def _fp8_x_fp8(x, q2, s2):
    """Activations quantized per token (dynamic scales), then float8 x float8 with float32
    accumulation, written in the model's 16-bit dtype (float32 for a float32 model, so
    tensor-parallel partial sums stay exact); the output dims contract on both operands' last axis
    (x [T, K], q [N, K]): the "TN" GEMM the GPU's float8 path runs as is."""
    xf = x.astype(jnp.float32)
    sx = jnp.maximum(jnp.max(jnp.abs(xf), axis=-1), 1e-12) / FP8_MAX  # [T] per-token scale
    xq = (xf / sx[:, None]).astype(FP8)
    out = jnp.float32 if x.dtype == jnp.float32 else x.dtype
    y = jax.lax.dot_general(xq, q2, (((1,), (1,)), ((), ())), preferred_element_type=out)
    return (y.astype(jnp.float32) * sx[:, None] * s2[None, :]).astype(x.dtype)


def _quantized_sharding(sh, ndim: int):
    """The sharding of {"q", "s"} from the bf16 weight's NamedSharding (input axis moved last)."""
    if not isinstance(sh, NamedSharding):
        return None
    spec = tuple(sh.spec) + (None,) * (ndim - len(sh.spec))
    return {"q": NamedSharding(sh.mesh, P(*spec[1:], spec[0])), "s": NamedSharding(sh.mesh, P(*spec[1:]))}


class LeafQuantizer:
    """Quantizes one placed tensor at a time as the loader places it (`loader.load_model(...,
    quantization=)`): a layer projection becomes float8 (or, for "awq" / "gptq" on dummy weights,
    4-bit groups rounded to nearest: int4.quantize) right away and its 16-bit original is
    freed before the next tensor arrives, so the device never holds the 16-bit model (a float8
    70B fits where its bf16 weights would not) and the float8 tensors lie one after another
    instead of among the holes a whole 16-bit model leaves when it is quantized afterwards. On an
    H200 (8B), quantized afterwards: the sampler's 3.92 GiB block did not fit in the 9.3 GiB the
    KV cache left free and warm-up restarted; quantized while loading: 0.03 GiB of holes, a 9.55
    GiB largest free block after the cache, no restart (docs/benchmarks.md, 2026-12-01). Shardings follow the originals; one
    compiled quantizer per (shape, dtype, sharding)."""

    def __init__(self, method: str):
        if method not in METHODS:
            raise ValueError(f"quantization must be one of {METHODS}, got {method!r}")
        self.method = method
        self._fns: dict = {}

    def wants(self, path: tuple) -> bool:
        """path: a params leaf's path, e.g. ("layers", 3, "w_gate_up")."""
        return len(path) == 3 and path[0] == "layers" and path[2] in QUANTIZED

    def __call__(self, path: tuple, w):
        if not self.wants(path) or is_quantized(w):
            return w
        if self.method in int4.METHODS:
            sh = getattr(w, "sharding", None)
            sh = sh if isinstance(sh, NamedSharding) else None
            fn = functools.partial(int4.quantize, group=int4.dummy_group(w.shape[0]))
            outs = {"qw": sh, "s": sh, "z": sh} if sh is not None else None
        else:
            sh = _quantized_sharding(getattr(w, "sharding", None), w.ndim)
            fn, outs = quantize_weight, sh
        # a sharding (not its repr) names its devices: pipeline stages' meshes differ only there
        key = (w.shape, str(w.dtype), next(iter(outs.values())) if outs else None)
        if key not in self._fns:
            self._fns[key] = jax.jit(fn, out_shardings=outs) if outs is not None else jax.jit(fn)
        return self._fns[key](w)


def quantize_params(params: dict, method: str) -> dict:
    """Quantize the layer projections of an already loaded model in place of the originals, one
    tensor at a time (each 16-bit tensor is freed as soon as its float8 copy exists, so the peak is
    the 16-bit model plus one tensor). The engine quantizes while loading instead (LeafQuantizer)."""
    quantize = LeafQuantizer(method)
    for i, lp in enumerate(params["layers"]):
        for name in QUANTIZED:
            if lp.get(name) is not None:
                lp[name] = quantize(("layers", i, name), lp[name])
    jax.block_until_ready(params)
    return params
