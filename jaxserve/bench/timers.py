"""Host wall time inside chosen methods, for the benchmark scripts that split an engine step."""
from __future__ import annotations

import collections
import functools
import time


class Timers:
    """wrap(obj, name) replaces obj.name (an instance or a class) with a timed version; s[key] holds
    its seconds and n[key] its calls. Wrapped calls nest: an outer method's time holds its inner ones."""

    def __init__(self):
        self.s = collections.Counter()
        self.n = collections.Counter()

    def reset(self) -> None:
        self.s.clear()
        self.n.clear()

    def wrap(self, obj, name: str, key: str | None = None) -> None:
        fn = getattr(obj, name)
        key = key or name

        @functools.wraps(fn)
        def timed(*args, **kw):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                self.s[key] += time.perf_counter() - t0
                self.n[key] += 1
        setattr(obj, name, timed)
