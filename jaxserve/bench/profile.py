"""Where device time goes: run a callable under the JAX profiler and summarize the trace's GPU
kernels (total time per kernel name and per category, and how busy the device was over the wall
time). Used by scripts/bench_engine_suite.py --profile."""
from __future__ import annotations

import collections
import glob
import os
import time
from typing import Callable, Optional

CATEGORIES = (  # first match wins; lower-case substrings of kernel names
    ("attention", ("ragged_paged_attention", "paged_attention")),
    ("int4 products", ("int4", "mosaic", "widen")),  # the 4-bit kernels (Triton, Mosaic GPU, the widening pass)
    ("matmul", ("gemm", "xmma", "cutlass", "cublas", "nvjet", "sm90_", "dot")),
    ("kv_write", ("scatter",)),
    ("copy/memset", ("memcpy", "memset", "copy")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other (fusions, sampling, norms)"


def summarize(trace_dir: str, wall_s: float, top: int = 20) -> dict:
    """Aggregate the GPU planes of the newest .xplane.pb under trace_dir."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return dict(error=f"no .xplane.pb under {trace_dir}")
    pd = ProfileData.from_file(files[-1])
    per_name: dict = collections.Counter()
    count: dict = collections.Counter()
    intervals = []
    line_names = []
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        for line in plane.lines:
            line_names.append(line.name)
            # Stream lines hold the kernels; XLA-op and module lines repeat the same time.
            if not line.name.lower().startswith("stream"):
                continue
            for ev in line.events:
                per_name[ev.name] += ev.duration_ns
                count[ev.name] += 1
                intervals.append((ev.start_ns, ev.end_ns))
    busy = 0.0
    end = None
    gaps = []  # (idle ns, start of the idle interval)
    for a, b in sorted(intervals):  # union of kernel intervals = time the GPU was doing something
        if end is None or a > end:
            if end is not None:
                gaps.append((a - end, end))
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    first = min(a for a, _ in intervals) if intervals else 0
    span = (end - first) if intervals else 0
    total = sum(per_name.values()) or 1
    by_cat: dict = collections.Counter()
    for n, t in per_name.items():
        by_cat[category(n)] += t
    return dict(
        wall_s=wall_s,
        gpu_busy_s=busy / 1e9,
        gpu_busy_frac=busy / 1e9 / wall_s if wall_s else None,
        # From the first kernel to the last (the profiler's own start-up and flush excluded): the
        # device's idle time inside the run, and its largest gaps (ms, at s after the first kernel).
        gpu_span_s=span / 1e9,
        gpu_idle_in_span_s=(span - busy) / 1e9,
        idle_gaps_over_1ms=dict(count=sum(g > 1e6 for g, _ in gaps), s=sum(g for g, _ in gaps if g > 1e6) / 1e9),
        largest_gaps=[dict(ms=round(g / 1e6, 2), at_s=round((t - first) / 1e9, 3)) for g, t in sorted(gaps)[::-1][:8]],
        kernel_s=total / 1e9,
        by_category={k: round(v / total, 4) for k, v in by_cat.most_common()},
        top_kernels=[dict(name=n[:90], frac=round(t / total, 4), calls=count[n], mean_us=round(t / count[n] / 1e3, 1))
                     for n, t in per_name.most_common(top)],
        gpu_lines=line_names[:12],
    )


def host_summary(trace_dir: str, per: int = 1, top: int = 30) -> dict:
    """Where the host's threads spent the traced time: total and self time (less the events nested
    directly inside, on the same thread) per event name on the host plane, in ms divided by `per`
    (the number of engine steps traced), and calls per `per`; and each thread's time in top-level
    events. The nested names (a jitted call's dispatch, PjRt's execute, XLA's thunks) show how a
    step's host time splits below Python."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    if not files:
        return dict(error=f"no .xplane.pb under {trace_dir}")
    total: dict = collections.Counter()
    own: dict = collections.Counter()
    count: dict = collections.Counter()
    threads: dict = collections.Counter()
    for plane in ProfileData.from_file(files[-1]).planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            stack: list = []  # (end, name) of the events open at this point
            for a, b, name in sorted(((ev.start_ns, ev.end_ns, ev.name) for ev in line.events),
                                     key=lambda e: (e[0], -e[1])):
                while stack and stack[-1][0] <= a:
                    stack.pop()
                if not any(n == name for _, n in stack):  # (an event inside one of its own name is the same call)
                    total[name] += b - a
                    count[name] += 1
                own[name] += b - a
                if stack:
                    own[stack[-1][1]] -= b - a
                else:
                    threads[line.name] += b - a
                stack.append((b, name))
    ms = lambda ns: round(ns / 1e6 / per, 4)  # noqa: E731
    return dict(
        per=per,
        top_total=[dict(name=n[:100], ms=ms(t), self_ms=ms(own[n]), calls=round(count[n] / per, 2))
                   for n, t in total.most_common(top)],
        top_self=[dict(name=n[:100], self_ms=ms(t), calls=round(count[n] / per, 2)) for n, t in own.most_common(top)],
        threads={n[:60]: ms(t) for n, t in threads.most_common(8)},
    )


def profile(fn: Callable[[], object], trace_dir: str, top: int = 20) -> tuple[object, dict]:
    """Run fn() under jax.profiler.trace; return (fn's result, summarize(...))."""
    import jax

    t0 = time.perf_counter()
    with jax.profiler.trace(trace_dir):
        res = fn()
    wall = time.perf_counter() - t0
    return res, summarize(trace_dir, wall, top)


def trace_calls(f, args, iters: int, trace_dir: Optional[str] = None) -> str:
    """One warm call of f(*args), then iters calls back to back under the profiler and one wait;
    returns the trace directory (read it with summarize or op_times)."""
    import tempfile

    import jax

    jax.block_until_ready(f(*args))
    trace_dir = trace_dir or tempfile.mkdtemp(prefix="jaxserve_trace_")
    with jax.profiler.trace(trace_dir):
        for _ in range(iters):
            out = f(*args)
        jax.block_until_ready(out)
    return trace_dir


def op_times(trace_dir: str, plane_prefix: str = "/device:GPU") -> dict:
    """{HLO instruction: [device ns, kernel launches]} over the newest .xplane.pb under trace_dir,
    from the `hlo_op` stat on each kernel's event (plane_prefix picks the device; inside a command
    buffer every kernel carries the buffer's name, so profile programs compiled without them)."""
    from jax.profiler import ProfileData

    files = sorted(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
    out: dict = {}
    for plane in ProfileData.from_file(files[-1]).planes if files else []:
        if not plane.name.startswith(plane_prefix):
            continue
        for line in plane.lines:
            if plane_prefix.startswith("/device:GPU") and not line.name.lower().startswith("stream"):
                continue  # the XLA-op and module lines repeat the kernels' time
            for ev in line.events:
                op = dict(ev.stats).get("hlo_op")
                if op:
                    acc = out.setdefault(op, [0.0, 0])
                    acc[0] += ev.duration_ns
                    acc[1] += 1
    return out
