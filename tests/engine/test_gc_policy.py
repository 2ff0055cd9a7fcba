"""engine/gc_policy.py: the collector settings the step loops run under, and that they come back."""
import contextlib
import gc

import pytest

from jaxserve.engine.gc_policy import QUIET_GEN0_THRESHOLD, quiet_gc


def test_quiet_gc_applies_and_undoes_its_settings_even_on_error():
    before = gc.get_threshold()
    frozen = gc.get_freeze_count()
    with quiet_gc():
        inside = gc.get_threshold()
        assert inside[0] == max(QUIET_GEN0_THRESHOLD, before[0]) and inside[1:] == before[1:]
        assert gc.get_freeze_count() > frozen  # the heap alive at entry is out of full collections
        with quiet_gc():  # nested: one freeze, undone by the outermost exit
            pass
        assert gc.get_threshold() == inside and gc.get_freeze_count() > frozen
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0
    with pytest.raises(RuntimeError):
        with quiet_gc():
            raise RuntimeError("step failed")
    assert gc.get_threshold() == before and gc.get_freeze_count() == 0


def test_objects_dropped_after_the_loop_are_collected():
    """A reference cycle made before the loop and dropped after it is freed by the next
    collection: the freeze does not outlive the loop (a permanent one leaked whole engines)."""
    class Node:
        pass

    a, b = Node(), Node()
    a.other, b.other = b, a
    with quiet_gc():
        pass
    import weakref

    ref = weakref.ref(a)
    del a, b
    gc.collect()
    assert ref() is None


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

    assert collections(quiet_gc()) * 10 < collections(contextlib.nullcontext())
