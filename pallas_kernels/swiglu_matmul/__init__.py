"""silu(x @ W_gate) * (x @ W_up) in one Mosaic-GPU kernel (wgmma products fed by TMA, the gate in the
epilogue) for large bf16 steps on Hopper, and its jnp reference. Contract: reference.py. Measured,
not used by the engine (kernel.py's status)."""
from .reference import swiglu_matmul_reference

__all__ = ["swiglu_matmul_reference"]
