"""The engine's step-level trace (LLMEngine.trace): one record per step with the scheduler's
snapshot (blocks in use, running/waiting, prefix hits, per-request states). Saved as JSON so a
user can see why a workload is slow, and plotted by notebooks/03_paged_kv_cache.ipynb."""
from __future__ import annotations

import json


def save_trace(trace: list, path: str) -> None:
    with open(path, "w") as f:
        json.dump({"version": 1, "steps": trace}, f, default=_default)


def load_trace(path: str) -> list:
    with open(path) as f:
        return json.load(f)["steps"]


def _default(o):
    if isinstance(o, (set, frozenset, tuple)):
        return list(o)
    if hasattr(o, "item"):
        return o.item()
    return str(o)
