"""How the engine keeps Python's garbage collector off the step loop's critical path.

The host thread that schedules and dispatches steps is the one a collection stops. `quiet_gc()`
wraps a stepping loop (LLM.generate; the server's engine thread for its lifetime):
- on entry everything alive moves to the collector's permanent generation (`gc.freeze()`), so a
  full collection no longer walks the start-up heap (the model's pytrees, JAX's caches and
  executables, the tokenizer: ~0.5M tracked objects; ~0.28 s per full collection on the CI CPU,
  and one landing mid-run idled an H200 for 236 ms);
- the youngest generation's threshold goes from Python's 700 allocations to 50,000, so the
  loop's per-step containers trigger ~70x fewer collections of the older generations;
- on exit both are undone (`gc.unfreeze()`, the old thresholds): an engine the caller drops
  afterwards is collected as usual. (Freezing for good at start-up instead kept every discarded
  engine's reference cycles alive: the test suite, which builds dozens of engines in one
  process, ran out of 24 GiB.)
Nested and concurrent loops share one freeze: the first entry applies it, the last exit undoes it.
"""
from __future__ import annotations

import contextlib
import gc
import threading

QUIET_GEN0_THRESHOLD = 50_000

_lock = threading.Lock()
_depth = 0
_saved = None


@contextlib.contextmanager
def quiet_gc(gen0: int = QUIET_GEN0_THRESHOLD):
    global _depth, _saved
    with _lock:
        if _depth == 0:
            _saved = gc.get_threshold()
            gc.set_threshold(max(gen0, _saved[0]), *_saved[1:])
            gc.freeze()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                gc.unfreeze()
                gc.set_threshold(*_saved)
