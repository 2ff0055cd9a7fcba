"""Host seconds inside swap preemption's pieces (runner._swap_out / _swap_in and what they call)
during bench_engine_suite's 1000 / 1000 with an H100-sized cache and swap preemption, in-process
with those methods wrapped; one JSON line at exit. docs/benchmarks.md, 2026-12-01 eighth session.

    python3 scripts/bench_swap_host_time.py [extra bench_engine_suite arguments]
"""
import atexit
import json
import sys

from jaxserve.bench.timers import Timers
from jaxserve.runner import model_runner as mr

PIECES = ("_swap_out", "_swap_in", "_fetch_blocks", "_gather_blocks", "_scatter_blocks", "_host", "_apply_block_ops")
T = Timers()


def report():
    pieces = {k: dict(s=round(v, 3), calls=T.n[k]) for k, v in T.s.items()}
    print(json.dumps(dict(kind="swap_host_time", **pieces)), flush=True)


if __name__ == "__main__":
    import bench_engine_suite  # (scripts/ is on sys.path when a script in it runs)

    for n in PIECES:
        T.wrap(mr.ModelRunner, n)
    atexit.register(report)
    sys.argv = ["bench_engine_suite.py", "--steps", "1", "--workloads", "1000x1000", "--num-gpu-blocks-override",
                "26700", "--preemption-mode", "swap", "--swap-space", "16", *sys.argv[1:]]
    bench_engine_suite.main()
