"""Tensor parallelism: the mesh, parameter shardings from the logical-axis rules, and KV-head
replication when the TP size exceeds the model's KV heads."""
from __future__ import annotations

import dataclasses

import numpy as np

from jaxserve.parallel.mesh import RULES, check_tensor_parallel, kv_cache_sharding, make_mesh, shardings_for


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    mesh: object  # jax.sharding.Mesh with axes ("stage", "model")
    size: int

    @classmethod
    def create(cls, size: int) -> "TensorParallel":
        return cls(make_mesh(size, 1), size)

    def arch_fn(self, arch):
        rep = check_tensor_parallel(self.size, arch.num_heads, arch.num_kv_heads, arch.vocab_size)
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

    def param_shardings(self, module, arch):
        if arch.intermediate_size % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} does not divide the MLP width "
                             f"{arch.intermediate_size}")
        rules = dict(RULES)
        if arch.vocab_size % self.size:  # an uneven vocabulary is replicated instead of split
            rules["vocab"] = None
        return shardings_for(module.param_logical_axes(arch), self.mesh, rules)

    def kv_sharding(self):
        return kv_cache_sharding(self.mesh)
