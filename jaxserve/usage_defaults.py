"""Batch-size defaults that depend on how the engine is used and what it runs on (vLLM's "usage
contexts"): applied only to settings the user left unset, and only on accelerators — on CPU the
config's own small defaults (128 sequences, 2048 tokens per step) stay.

Why these numbers (docs/benchmarks.md): offline, an 8192-token step runs its prefill GEMMs at
~730 TFLOP/s, and decode steps of 1024 rows run theirs near that rate where 256-row steps do not
(qkv and o projections of 256 rows fill half the SMs): on an H200, 1024 sequences gave 16.5k
output tok/s on 128 in / 128 out against 14.3k at 256, and the same on 1024 / 128 and 1000 / 1000
(2026-11-30, third session). 1024 sequences used to cost where prompts are long on an H100 (27
preemptions on 1024 / 128 with 421k tokens of cache): the scheduler's admission headroom
(SchedulerConfig.admission_headroom_tokens) now admits a prompt only when the running
sequences' growth still fits. A server wants short steps, because every prefill chunk in a step
delays the decode tokens riding with it (at 16 requests/s of 1024-token prompts the median time
per output token fell from 38 ms at a 2048-token budget to 25 ms at 1024 and 21 ms at 512, before
async scheduling), while a chunk of 1024 rows still runs its GEMMs at ~715 TFLOP/s.
"""
from __future__ import annotations

import logging
from typing import Optional

logger = logging.getLogger("jaxserve")

OFFLINE = "offline"  # LLM(...).generate, jaxserve generate / bench
SERVER = "server"  # jaxserve serve

_BIG_DEVICE_GIB = 40.0  # H100 / H200 / A100-80G class (the allocator's limit, not the card's size):
# smaller devices take 4096-token steps (an 8192-token step's temporaries would crowd out the KV cache)


def usage_defaults(context: str, platform: str, device_memory_gib: Optional[float]) -> dict:
    """The defaults for this context on this device; {} on CPU."""
    if context not in (OFFLINE, SERVER):
        raise ValueError(f"unknown usage context {context!r}; expected {OFFLINE!r} or {SERVER!r}")
    if platform == "cpu":
        return {}
    big = device_memory_gib is not None and device_memory_gib >= _BIG_DEVICE_GIB
    if context == OFFLINE:
        return dict(max_num_seqs=1024, max_num_batched_tokens=8192) if big else \
            dict(max_num_seqs=256, max_num_batched_tokens=4096)
    return dict(max_num_seqs=256, max_num_batched_tokens=1024)


def _device_info(utilization: float) -> tuple[str, Optional[float]]:
    import jax

    from jaxserve.runner.kv_cache import configure_xla_memory

    # Asking for the device starts XLA's allocator: give it the engine's memory fraction first
    # (the engine sets the same; set after the start it would not take effect).
    configure_xla_memory(utilization)
    d = jax.local_devices()[0]
    try:
        stats = d.memory_stats() or {}
    except Exception:  # noqa: BLE001 (some backends have no allocator statistics)
        stats = {}
    limit = stats.get("bytes_limit")
    return d.platform, (limit / 2**30 if limit else None)


def apply_usage_defaults(kwargs: dict, context: str, device_info=_device_info) -> dict:
    """kwargs with this context's defaults filled in where the user gave nothing (or None).
    Multi-process jobs are left alone: their backend must not start before jax.distributed."""
    if (kwargs.get("num_processes") or 1) > 1:
        return kwargs
    keys = ("max_num_seqs", "max_num_batched_tokens")
    if all(kwargs.get(k) is not None for k in keys):
        return kwargs
    from jaxserve.config import CacheConfig

    util = kwargs.get("gpu_memory_utilization")
    platform, gib = device_info(CacheConfig.gpu_memory_utilization if util is None else util)
    extra = {k: v for k, v in usage_defaults(context, platform, gib).items() if kwargs.get(k) is None}
    if extra:
        logger.info("%s defaults for %s (%s GiB): %s", context, platform,
                    "?" if gib is None else f"{gib:.0f}", ", ".join(f"{k}={v}" for k, v in extra.items()))
    return {**kwargs, **extra}
