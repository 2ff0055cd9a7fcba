"""Swap preemption's block transfers (runner._apply_block_ops): any number of blocks goes out to
the host pool and back in chunks of kvc.BLOCK_CHUNK, every value exact, through the shapes the
warm-up compiled (no compilation while serving, whatever the count)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve import LLM
from jaxserve.core.sched_output import SchedulerOutput
from jaxserve.runner import kv_cache as kvc


@pytest.fixture(scope="module")
def runner():
    llm = LLM(max_model_len=256, max_num_batched_tokens=64, max_num_seqs=4, num_gpu_blocks_override=400,
              preemption_mode="swap", swap_space=0.25, enable_prefix_caching=False)
    r = llm.llm_engine.runner
    assert r.num_host_blocks >= 2 * 133
    keys = jax.random.split(jax.random.PRNGKey(0), len(r.kv_caches))
    r.kv_caches = [jax.random.normal(k, kv.shape, jnp.float32).astype(kv.dtype) for k, kv in zip(keys, r.kv_caches)]
    return r


def _ops(**kw):
    return SchedulerOutput(scheduled=[], total_num_tokens=0, **kw)


def test_swap_round_trip_in_chunks_exact_and_without_compiling(runner):
    r = runner
    before = [np.asarray(kv) for kv in r.kv_caches]  # [2, NB, BS, H, D] per layer
    compiles = r.num_compilations()
    rng = np.random.default_rng(1)
    # 64 + 64 + 5 (padded to 8), 64 + 6, one padded chunk, then a full chunk of consecutive slots
    # (swap-in sends a view of the pool, no copy)
    for n, run in ((133, False), (70, False), (5, False), (64, True)):
        src = rng.choice(np.arange(1, 400), n, replace=False).tolist()
        slots = list(range(10, 10 + n)) if run else rng.choice(r.num_host_blocks, n, replace=False).tolist()
        r._apply_block_ops(_ops(swap_out=list(zip(src, slots))))
        pool = r._host()  # [host blocks, L, 2, BS, H, D]: a block's layers side by side
        for layer, ref in enumerate(before):
            np.testing.assert_array_equal(pool[slots, layer], np.moveaxis(ref[:, src], 1, 0))
        free = sorted(set(range(1, 400)) - set(src))
        dst = rng.choice(free, n, replace=False).tolist()
        r._apply_block_ops(_ops(swap_in=list(zip(slots, dst))))
        after = [np.asarray(kv) for kv in r.kv_caches]
        untouched = sorted(set(range(1, 400)) - set(dst))
        for layer, ref in enumerate(before):
            np.testing.assert_array_equal(after[layer][:, dst], ref[:, src])  # the swapped blocks, moved
            np.testing.assert_array_equal(after[layer][:, untouched], ref[:, untouched])  # nothing else
        before = after
    assert r.num_compilations() == compiles  # 8- and 64-block shapes only, compiled at warm-up


def test_pad_pairs_refuses_more_than_a_chunk():
    src, dst = kvc.pad_pairs([(3, 4)] * 9)
    assert src.tolist() == [3] * 9 + [0] * 55 and dst.tolist() == [4] * 9 + [0] * 55
    assert [len(c) for c in kvc.chunks(list(range(133)))] == [64, 64, 5]
    with pytest.raises(ValueError, match="chunks"):
        kvc.pad_pairs([(1, 1)] * 65)
