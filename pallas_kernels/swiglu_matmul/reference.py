"""The contract of kernel.py: h = silu(x @ W[:, 0]) * (x @ W[:, 1]), the Llama MLP's gated product.

x [T, E], W [E, 2, F] (index 0 = gate, 1 = up; the model's fused gate+up weight) -> [T, F] in x's
dtype. Both products accumulate in float32 and the gate is applied to the float32 sums, rounded
once at the end (the unfused engine rounds the two products to x's dtype first, then multiplies:
the two differ by about one rounding of x's dtype).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def swiglu_matmul_reference(x, w):
    """x [T, E], w [E, 2, F] -> [T, F] in x's dtype."""
    gu = jnp.einsum("te,eaf->taf", x, w, preferred_element_type=jnp.float32)  # [T, 2, F]
    return (jax.nn.silu(gu[:, 0]) * gu[:, 1]).astype(x.dtype)
