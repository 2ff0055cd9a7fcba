"""Rotary position embeddings: inverse frequencies for each rope-scaling type (computed once on
the host with numpy, matching HF transformers' definitions) and the neox-style rotation."""
from __future__ import annotations

import math
from typing import Optional

import jax.numpy as jnp
import numpy as np


def _default(theta: float, dim: int) -> np.ndarray:
    return 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))


def rope_inv_freq(theta: float, dim: int, scaling: Optional[dict], max_position: int,
                  max_model_len: int) -> tuple[np.ndarray, float]:
    """Returns (inv_freq [dim // 2] float64, attention_scaling applied to cos/sin)."""
    kind = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default")) if scaling else "default"
    inv = _default(theta, dim)
    if kind == "default":
        return inv, 1.0
    factor = float(scaling["factor"])
    if kind == "linear":
        return inv / factor, 1.0
    if kind == "dynamic":
        # HF rescales by the current sequence length once it passes max_position; with static
        # shapes the engine fixes it at max_model_len (identical for every length <= max_position).
        if max_model_len <= max_position:
            return inv, 1.0
        base = theta * ((factor * max_model_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
        return _default(base, dim), 1.0
    if kind == "llama3":
        low_ff = float(scaling.get("low_freq_factor", 1.0))
        high_ff = float(scaling.get("high_freq_factor", 4.0))
        old_ctx = float(scaling.get("original_max_position_embeddings", 8192))
        low_wl, high_wl = old_ctx / low_ff, old_ctx / high_ff
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / factor, inv)
        smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        return np.where(medium, smoothed, scaled), 1.0
    if kind == "yarn":
        orig = float(scaling.get("original_max_position_embeddings") or max_position)
        beta_fast = float(scaling.get("beta_fast") or 32)
        beta_slow = float(scaling.get("beta_slow") or 1)
        mscale = scaling.get("mscale")
        mscale_all = scaling.get("mscale_all_dim")

        def get_mscale(scale, m=1.0):
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        att = scaling.get("attention_factor")
        if att is None:
            att = (get_mscale(factor, mscale) / get_mscale(factor, mscale_all)
                   if mscale and mscale_all else get_mscale(factor))

        def corr_dim(rot):
            return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(theta))

        low, high = corr_dim(beta_fast), corr_dim(beta_slow)
        if scaling.get("truncate", True):
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0, 1)
        extrap = 1 - ramp
        pos_freqs = theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
        return inv, float(att)
    raise ValueError(f"unsupported rope scaling type {kind!r}; supported: default, linear, dynamic, llama3, yarn")


def cos_sin(positions, inv_freq, attention_scaling: float):
    """positions [T] int32 -> cos, sin [T, dim // 2] float32."""
    ang = positions.astype(jnp.float32)[:, None] * jnp.asarray(inv_freq, jnp.float32)[None, :]
    return jnp.cos(ang) * attention_scaling, jnp.sin(ang) * attention_scaling


def apply_rope(x, cos, sin):
    """x [T, H, D] (neox layout: first and second halves rotate together)."""
    d2 = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :d2], xf[..., d2:]
    c, s = cos[:, None, :], sin[:, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)
