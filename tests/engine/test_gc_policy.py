"""engine/gc_policy.py: the collector settings the step loops run under, and that they come back."""
import gc

import pytest

from jaxserve.engine.gc_policy import QUIET_GEN0_THRESHOLD, freeze_startup_heap, quiet_gc


def test_quiet_gc_raises_the_young_threshold_and_restores_it_even_on_error():
    before = gc.get_threshold()
    with quiet_gc():
        inside = gc.get_threshold()
        assert inside[0] == max(QUIET_GEN0_THRESHOLD, before[0]) and inside[1:] == before[1:]
    assert gc.get_threshold() == before
    with pytest.raises(RuntimeError):
        with quiet_gc():
            raise RuntimeError("step failed")
    assert gc.get_threshold() == before


def test_quiet_gc_counts_fewer_young_collections():
    """The same allocation pattern (containers kept alive, as the engine's per-step rows are)
    runs ~70x fewer generation-0 collections under quiet_gc."""
    def collections(ctx):
        keep = []
        with ctx:
            n0 = gc.get_stats()[0]["collections"]
            for i in range(200_000):
                keep.append([i])
            return gc.get_stats()[0]["collections"] - n0

    import contextlib

    assert collections(quiet_gc()) * 10 < collections(contextlib.nullcontext())


def test_freeze_moves_the_heap_to_the_permanent_generation():
    gc.unfreeze()
    freeze_startup_heap()
    try:
        assert gc.get_freeze_count() > 1000
    finally:
        gc.unfreeze()
