"""Meshes and the one rule table from logical axis names to mesh axes.

A replica of the engine runs on a mesh with axes ("stage", "model"): pipeline stages x tensor
parallel ranks. Data parallelism is replicas (each with its own scheduler) on disjoint device
sets, so it has no mesh axis here. Params carry logical axis names (models/*.param_logical_axes);
RULES maps them to mesh axes, so tensor parallelism is a mesh with model > 1 and nothing else.
"""
from __future__ import annotations

from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# logical axis -> mesh axis (None: replicated). Column-parallel projections split their output
# features, row-parallel ones their input features; XLA inserts the all-reduce after them.
RULES: dict[str, Optional[str]] = {
    "vocab": "model",
    "embed": None,
    "q_heads": "model",
    "kv_heads": "model",
    "heads_in": "model",  # o_proj input (row parallel)
    "mlp": "model",
    "mlp_in": "model",  # down_proj input (row parallel)
    # the (gate, up) axis of w_gate_up [E, 2, F]: replicated, so the split of F ("mlp") leaves
    # every rank the gate and up columns of the same F slice
    "gate_up": None,
    "norm": None,
    "head_dim": None,
}


class ParallelismError(ValueError):
    pass


def check_tensor_parallel(tp: int, num_heads: int, num_kv_heads: int, vocab_size: int) -> int:
    """Validate a tensor-parallel size against the model's heads; returns the KV-head replication
    factor (1 unless tp exceeds the KV heads, when each KV head is copied tp // num_kv_heads times)."""
    if tp == 1:
        return 1
    works = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and
             (num_kv_heads % d == 0 or d % num_kv_heads == 0)]
    if num_heads % tp:
        raise ParallelismError(
            f"tensor_parallel_size={tp} does not divide the model's {num_heads} attention heads; "
            f"sizes that work: {works}")
    if num_kv_heads % tp and tp % num_kv_heads:
        raise ParallelismError(
            f"tensor_parallel_size={tp} and the model's {num_kv_heads} KV heads: one must divide the "
            f"other; sizes that work: {works}")
    return 1 if num_kv_heads % tp == 0 else tp // num_kv_heads


def make_mesh(tp: int, pp: int = 1, devices: Optional[Sequence] = None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    need = tp * pp
    if len(devices) < need:
        raise ParallelismError(
            f"tensor_parallel_size={tp} x pipeline_parallel_size={pp} needs {need} devices, "
            f"{len(devices)} visible ({devices[0].platform}); on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={need}")
    arr = np.array(devices[:need]).reshape(pp, tp)
    return Mesh(arr, ("stage", "model"))


def spec_for(axes: Optional[tuple], rules: dict = RULES) -> P:
    if axes is None:
        return P()
    return P(*[rules.get(a) if a is not None else None for a in axes])


def shardings_for(logical_axes_tree, mesh: Mesh, rules: dict = RULES):
    """Pytree of logical-axis tuples -> pytree of NamedSharding on `mesh`."""
    return jax.tree_util.tree_map(lambda axes: NamedSharding(mesh, spec_for(axes, rules)), logical_axes_tree,
                                  is_leaf=lambda x: x is None or (isinstance(x, tuple) and
                                                                  all(isinstance(a, (str, type(None))) for a in x)))
