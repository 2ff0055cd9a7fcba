"""Host seconds inside swap preemption's pieces (runner._swap_out / _swap_in and what they call)
during bench_engine_suite's 1000 / 1000 with an H100-sized cache and swap preemption, in-process
with those methods wrapped; one JSON line at exit. docs/benchmarks.md, 2026-12-01 eighth session.

    python3 scripts/bench_swap_host_time.py [extra bench_engine_suite arguments]
"""
import atexit
import collections
import json
import sys
import time

from jaxserve.runner import model_runner as mr

T = collections.defaultdict(lambda: [0.0, 0])  # method -> [host seconds, calls]
PIECES = ("_swap_out", "_swap_in", "_fetch_blocks", "_gather_blocks", "_scatter_blocks", "_host", "_apply_block_ops")


def wrap(cls, name):
    f = getattr(cls, name)

    def timed(*a, **k):
        t0 = time.perf_counter()
        try:
            return f(*a, **k)
        finally:
            T[name][0] += time.perf_counter() - t0
            T[name][1] += 1
    setattr(cls, name, timed)


def report():
    pieces = {k: dict(s=round(v[0], 3), calls=v[1]) for k, v in T.items()}
    print(json.dumps(dict(kind="swap_host_time", **pieces)), flush=True)


if __name__ == "__main__":
    import bench_engine_suite  # (scripts/ is on sys.path when a script in it runs)

    for n in PIECES:
        wrap(mr.ModelRunner, n)
    atexit.register(report)
    sys.argv = ["bench_engine_suite.py", "--steps", "1", "--workloads", "1000x1000", "--num-gpu-blocks-override",
                "26700", "--preemption-mode", "swap", "--swap-space", "16", *sys.argv[1:]]
    bench_engine_suite.main()
