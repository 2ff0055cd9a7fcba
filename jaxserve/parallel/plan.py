"""ParallelPlan: where one engine replica's weights, KV cache and step inputs live.

The replica's devices form a mesh ("stage", "model") = pipeline stages x tensor-parallel ranks.
Layers are split into contiguous stages; each stage runs on its own tensor-parallel sub-mesh
("model" axis only), with the logical-axis RULES deciding how each weight splits. The embedding
lives on the first stage, the final norm and LM head on the last (a tied embedding is copied to
the last stage). Each device receives only its slice of each tensor.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxserve.parallel.mesh import RULES, ParallelismError, check_tensor_parallel, make_mesh, shardings_for


def split_layers(num_layers: int, pp: int) -> tuple[range, ...]:
    """Contiguous stages whose sizes differ by at most one (earlier stages get the extra layer)."""
    if pp > num_layers:
        raise ParallelismError(f"pipeline_parallel_size={pp} exceeds the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    out, start = [], 0
    for s in range(pp):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return tuple(out)


@dataclasses.dataclass(frozen=True)
class ParallelPlan:
    mesh: Mesh  # ("stage", "model")

    @classmethod
    def create(cls, tp: int, pp: int = 1, devices: Optional[Sequence] = None) -> "ParallelPlan":
        return cls(make_mesh(tp, pp, devices))

    @property
    def tp(self) -> int:
        return self.mesh.shape["model"]

    @property
    def pp(self) -> int:
        return self.mesh.shape["stage"]

    def stage_mesh(self, s: int) -> Mesh:
        return Mesh(self.mesh.devices[s], ("model",))

    def replicated(self, s: int) -> NamedSharding:
        return NamedSharding(self.stage_mesh(s), P())

    # ---- the model under this plan ------------------------------------------------------------
    def arch_fn(self, arch):
        rep = check_tensor_parallel(self.tp, arch.num_heads, arch.num_kv_heads, arch.vocab_size)
        split_layers(arch.num_layers, self.pp)  # raises when there are more stages than layers
        return dataclasses.replace(arch, num_kv_heads=arch.num_kv_heads * rep) if rep > 1 else arch

    def transform_fn(self, ckpt_arch, arch):
        """Copies each KV head's k/v projection `rep` times, so every TP rank owns one copy."""
        rep = arch.num_kv_heads // ckpt_arch.num_kv_heads
        if rep == 1:
            return None
        d = arch.head_dim

        def tf(path, arr):
            if path[-1] in ("wk", "wv"):  # [E, Hkv*D] -> [E, Hkv*rep*D]
                e = arr.shape[0]
                return np.repeat(arr.reshape(e, -1, d), rep, axis=1).reshape(e, -1)
            if path[-1] in ("bk", "bv"):
                return np.repeat(arr.reshape(-1, d), rep, axis=0).reshape(-1)
            return arr
        return tf

    def _rules(self, arch) -> dict:
        if arch.intermediate_size % self.tp:
            raise ParallelismError(f"tensor_parallel_size={self.tp} does not divide the MLP width "
                                   f"{arch.intermediate_size}")
        rules = dict(RULES)
        if arch.vocab_size % self.tp:  # an uneven vocabulary is replicated instead of split
            rules["vocab"] = None
        return rules

    def param_shardings(self, module, arch) -> dict:
        axes = module.param_logical_axes(arch)
        rules = self._rules(arch)
        stages = split_layers(arch.num_layers, self.pp)
        out = {}
        for key, val in axes.items():
            if key == "layers":
                out[key] = [shardings_for(val[j], self.stage_mesh(self.stage_of(j, stages)), rules)
                            for j in range(len(val))]
            else:
                s = 0 if key == "embed" else self.pp - 1
                out[key] = shardings_for(val, self.stage_mesh(s), rules)
        return out

    def head_sharding(self, module, arch):
        """Where the tied embedding's copy lives on the last stage."""
        return shardings_for(module.param_logical_axes(arch)["embed"], self.stage_mesh(self.pp - 1),
                             self._rules(arch))

    @staticmethod
    def stage_of(layer: int, stages: tuple[range, ...]) -> int:
        return next(s for s, r in enumerate(stages) if layer in r)

    def kv_sharding(self, s: int) -> NamedSharding:
        """[2, num_blocks, block_size, num_kv_heads, head_dim] split on the KV heads."""
        return NamedSharding(self.stage_mesh(s), P(None, None, None, "model", None))


def put(tree, sharding):
    """Host arrays (a pytree) -> device arrays with `sharding` (None: the default device,
    uncommitted). Works when the sharding spans devices of other processes (multi-host), where
    each process supplies the same host values."""
    if sharding is None:
        return jax.device_put(tree)
    if sharding.is_fully_addressable:
        return jax.device_put(tree, sharding)

    def one(x):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx], dtype=x.dtype)
    return jax.tree_util.tree_map(one, tree)


def to_host_async(x):
    """Start copying device array x to the host; read the result with fetch(). The copy goes to
    page-locked (pinned) host memory where the device has it: on an H200 a 134 MB swap chunk moved
    at 52 GB/s that way against 1.1 GB/s through copy_to_host_async and np.asarray
    (scripts/bench_swap_io.py, docs/benchmarks.md 2026-12-01 eighth session). Arrays spread over
    processes are returned as they are (fetch replicates them first)."""
    if not getattr(x, "is_fully_addressable", True):
        return x
    if any(m.kind == "pinned_host" for m in next(iter(x.devices())).addressable_memories()):
        return jax.device_put(x, x.sharding.with_memory_kind("pinned_host"))
    x.copy_to_host_async()
    return x


def fetch(tree, plan: Optional[ParallelPlan] = None, stage: int = 0):
    """Device arrays (living on `stage` of `plan`) -> numpy. When the stage spans several
    processes (multi-host tensor parallelism) the arrays are first replicated over the stage, so
    every process reads the whole value from one of its own devices (all processes make this
    call, as multi-host requires)."""
    leaves = jax.tree_util.tree_leaves(tree)
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return jax.device_get(tree)
    if plan is None:
        raise ValueError("arrays spread over processes need the plan that placed them")
    rep = jax.device_put(tree, plan.replicated(stage))
    return jax.tree_util.tree_map(lambda x: np.asarray(x.addressable_data(0)), rep)
