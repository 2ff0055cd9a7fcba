"""x @ W with W in 4-bit groups (AWQ / GPTQ): a Pallas GEMV-like kernel for decode-sized steps and its
jnp reference. Contract: reference.py."""
from .reference import dequantize, int4_matmul_reference, pack, unpack

__all__ = ["dequantize", "int4_matmul_reference", "pack", "unpack"]
