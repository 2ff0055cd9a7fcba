"""KV-cache sizing and block-level copies (copy-on-write, swap to host and back).

Layout per layer: [2, num_blocks, block_size, num_kv_heads, head_dim] (K at 0, V at 1); block 0
is the null block. All copy functions take the cache list donated and return the new one.
"""
from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

GIB = 1 << 30
logger = logging.getLogger("jaxserve")


class KVCacheTooSmallError(ValueError):
    pass


class SwapSpaceTooLargeError(ValueError):
    """preemption_mode="swap" asks for more host memory than the host has available."""


class StepOutOfMemoryError(MemoryError):
    """A compiled step does not fit in the device memory the KV cache leaves."""


_UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30, "TiB": 1 << 40,
          "KB": 10 ** 3, "MB": 10 ** 6, "GB": 10 ** 9, "TB": 10 ** 12}


def requested_bytes(message: str) -> Optional[int]:
    """The size an XLA out-of-memory error asked for ("... trying to allocate 3.91GiB ..."), or
    None when the message names none."""
    m = re.search(r"allocate\s+([0-9.]+)\s*([KMGT]?i?B)\b", message)
    if m is None or m.group(2) not in _UNITS:
        return None
    return int(float(m.group(1)) * _UNITS[m.group(2)])


_FP8 = {"fp8": jnp.float8_e4m3fn, "fp8_e4m3": jnp.float8_e4m3fn, "fp8_e5m2": jnp.float8_e5m2}


def cache_dtype(kv_cache_dtype: str, model_dtype) -> jnp.dtype:
    """The KV cache's element type for CacheConfig.kv_cache_dtype ("auto" = the model dtype)."""
    if kv_cache_dtype == "auto":
        return jnp.dtype(model_dtype)
    return jnp.dtype(_FP8.get(kv_cache_dtype, kv_cache_dtype))


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: jnp.dtype

    @property
    def bytes_per_block(self) -> int:
        return (self.num_layers * 2 * self.block_size * self.num_kv_heads * self.head_dim
                * jnp.dtype(self.dtype).itemsize)


def host_available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * GIB


def num_blocks_for_cpu(spec: KVCacheSpec, cpu_kv_cache_gib: float) -> int:
    """CPU rule: cpu_kv_cache_gib of host memory, but never more than a quarter of what is free."""
    budget = min(cpu_kv_cache_gib * GIB, host_available_bytes() // 4)
    return int(budget // spec.bytes_per_block)


def configure_xla_memory(utilization: float) -> None:
    """Let XLA's allocator have utilization x device memory. Only effective before the first
    device use; num_blocks_for_accelerator reads what is in effect either way."""
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", f"{utilization:.4f}")


def contiguous_free_bytes(stats: dict) -> Optional[int]:
    """The largest free block of the device allocator, where it is one pool reserved up front
    (JAX's default on GPUs: a BFC allocator preallocated at the memory fraction); None where that
    figure means something else (a growing pool, another allocator) or is not reported. One
    allocation (a KV-cache layer, a step's temporaries) needs one such block."""
    if os.environ.get("XLA_PYTHON_CLIENT_PREALLOCATE", "true").strip().lower() in ("false", "0"):
        return None
    if os.environ.get("XLA_PYTHON_CLIENT_ALLOCATOR", "default").strip().lower() not in ("default", "bfc"):
        return None
    largest = stats.get("largest_free_block_bytes")
    return None if largest is None else int(largest)


def num_blocks_for_accelerator(spec: KVCacheSpec, device, utilization: float,
                               activation_bytes: int) -> int:
    """What is left of utilization x device memory after the weights (already resident) and the
    peak activations of the largest compiled step. Free memory split into holes (e.g. between
    weights freed and re-made one by one) counts only as far as its largest block reaches: the
    cache's layers and a step's temporaries each need a whole block."""
    stats = device.memory_stats() or {}
    limit = stats.get("bytes_limit")
    in_use = stats.get("bytes_in_use", 0)
    if limit is None:
        raise RuntimeError(f"cannot read the memory size of {device}; set num_gpu_blocks_override")
    # The allocator's limit is (mem fraction in effect) x device memory; aim for utilization x it,
    # but never past what the allocator allows.
    frac = float(os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.75"))
    cap = min(limit, int(limit / frac * utilization))
    free = cap - in_use
    largest = contiguous_free_bytes(stats)
    if largest is not None and largest - (limit - cap) < free:
        block = max(0, largest - (limit - cap))  # the pool's tail past the cap is not ours
        logger.info("device memory: %.2f GiB free, but its largest free block is %.2f GiB (the rest "
                    "lies in holes between resident arrays); the KV cache is sized from that block",
                    free / GIB, block / GIB)
        free = block
    free -= activation_bytes + 256 * (1 << 20)
    return max(int(free // spec.bytes_per_block), 0)


def check_fits(num_blocks: int, spec: KVCacheSpec, max_model_len: int, where: str) -> None:
    usable_tokens = (num_blocks - 1) * spec.block_size
    if usable_tokens < max_model_len:
        raise KVCacheTooSmallError(
            f"the KV cache holds {max(usable_tokens, 0)} tokens ({num_blocks} blocks of "
            f"{spec.block_size}, {spec.bytes_per_block * num_blocks / GIB:.2f} GiB on {where}) but one "
            f"sequence of max_model_len={max_model_len} needs {max_model_len}. Lower max_model_len, or "
            f"give the cache more memory (gpu_memory_utilization on GPU, cpu_kv_cache_gib on CPU, "
            f"or num_gpu_blocks_override).")


def check_swap_space(swap_space_gib: float, available: int) -> None:
    """The swap pool is allocated and touched whole at start-up: refuse one that would take more
    than 90% of the host memory available now (it would end in the kernel's OOM killer instead)."""
    if swap_space_gib * GIB > 0.9 * available:
        raise SwapSpaceTooLargeError(
            f"swap_space={swap_space_gib:g} GiB of host memory for preemption_mode='swap', but the host "
            f"has {available / GIB:.1f} GiB available. Lower swap_space (at most "
            f"{0.9 * available / GIB:.0f}), or keep preemption_mode='recompute' (the default).")


def allocate(spec: KVCacheSpec, num_blocks: int, sharding=None) -> list:
    """One zeroed [2, num_blocks, block_size, H, D] array per layer, made directly in its shards.
    `sharding`: None (default device), one sharding for all layers, or a list with one per layer
    (pipeline stages put their layers on their own devices)."""
    shape = (2, num_blocks, spec.block_size, spec.num_kv_heads, spec.head_dim)
    shards = sharding if isinstance(sharding, (list, tuple)) else [sharding] * spec.num_layers
    makers = {}
    out = []
    for sh in shards:
        if sh not in makers:
            make = functools.partial(jnp.zeros, shape, spec.dtype)
            makers[sh] = jax.jit(make, out_shardings=sh) if sh is not None else make
        out.append(makers[sh]())
    return out


# Block lists of copy / gather / scatter are cut into chunks of at most BLOCK_CHUNK blocks, each
# padded to one of these lengths: the shapes warm-up compiles, so a swap never compiles while
# serving, and only a list's last chunk carries padding (a sequence's ~100 blocks move as 64 + 64;
# they used to be padded to 512, 5x the bytes, and lists past 4,096 compiled their own shape:
# 1000 / 1000 with swap preemption ran 3.2x slower than with recompute, 2026-12-01, seventh session).
PAIR_BUCKETS = (8, 64)
BLOCK_CHUNK = PAIR_BUCKETS[-1]  # 64 blocks of Llama-3-8B (all layers): 134 MB per transfer


def chunks(pairs: list, size: int = BLOCK_CHUNK):
    """pairs cut into consecutive lists of at most `size`."""
    return [pairs[i:i + size] for i in range(0, len(pairs), size)]


@functools.partial(jax.jit, donate_argnums=(0,))
def copy_blocks(kv_caches, src, dst):
    """kv_caches: list of [2, NB, BS, H, D]; src, dst [K] int32 (padding pairs (0, 0))."""
    return [kv.at[:, dst].set(kv[:, src]) for kv in kv_caches]


# Swapped blocks travel and rest block-major, [K, L, 2, BS, H, D]: one block's every layer is one
# contiguous host row (2 MB of Llama-3-8B), so landing a chunk in the host pool and taking it back
# out are K row copies, not L x 2 x K scattered pieces.
@jax.jit
def gather_blocks(kv_caches, ids):
    """-> [K, L, 2, BS, H, D]: the blocks `ids` [K] of every layer (for swap-out)."""
    return jnp.stack([jnp.moveaxis(kv[:, ids], 1, 0) for kv in kv_caches], axis=1)


@functools.partial(jax.jit, donate_argnums=(0,))
def scatter_blocks(kv_caches, ids, data):
    """Write data [K, L, 2, BS, H, D] into blocks `ids` [K] (swap-in)."""
    return [kv.at[:, ids].set(jnp.moveaxis(data[:, i], 0, 1).astype(kv.dtype)) for i, kv in enumerate(kv_caches)]


def pad_pairs(pairs, buckets=PAIR_BUCKETS) -> tuple[np.ndarray, np.ndarray]:
    """pairs (at most the largest bucket) -> (src, dst) [k] int32 padded with (0, 0) pairs to the
    smallest bucket k that holds them (the null block 0: its contents are never read)."""
    n = len(pairs)
    k = next((b for b in buckets if b >= n), None)
    if k is None:
        raise ValueError(f"{n} block pairs exceed the largest bucket {buckets[-1]}: cut them with chunks()")
    src = np.zeros(k, np.int32)
    dst = np.zeros(k, np.int32)
    if n:
        src[:n], dst[:n] = zip(*pairs)
    return src, dst
