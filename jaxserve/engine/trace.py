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


def summarize_trace(steps: list, *, start_time: float, max_num_seqs: int) -> dict:
    """Where a run's wall time went, from its step records (LLMEngine.trace, `time` = time.time()
    when the step's outputs were processed). Each record's time is the gap since the previous one
    (the first: since start_time), so under async scheduling it is the step's share of the
    pipeline. Steps that carry prompt tokens are "prefill" steps (decode rows riding along are
    counted there); the others are decode steps (num_steps sub-steps each), binned by how full the
    batch was: a run that spends long in the "low" bin has a tail of few sequences."""
    out = dict(wall_s=0.0, prefill=dict(steps=0, s=0.0, tokens=0), preemptions=0,
               decode={b: dict(steps=0, s=0.0, tokens=0) for b in ("full", "mid", "low")})
    prev = start_time
    for r in steps:
        dt = max(0.0, r["time"] - prev)
        prev = r["time"]
        out["preemptions"] += len(r.get("preempted") or ())
        k = int(r.get("num_steps", 1))
        rows = int(r["num_seqs"])
        if r["num_tokens"] > rows:  # some sequence computed more than one token: a prompt chunk
            p = out["prefill"]
            p["steps"] += 1
            p["s"] += dt
            p["tokens"] += int(r["num_tokens"])
            continue
        fill = rows / max(1, max_num_seqs)
        d = out["decode"]["full" if fill >= 0.9 else "mid" if fill >= 0.5 else "low"]
        d["steps"] += k
        d["s"] += dt
        d["tokens"] += rows * k
    out["wall_s"] = prev - start_time
    for d in [out["prefill"], *out["decode"].values()]:
        d["s"] = round(d["s"], 4)
        d["ms_per_step"] = round(1e3 * d["s"] / d["steps"], 3) if d["steps"] else None
    return out
