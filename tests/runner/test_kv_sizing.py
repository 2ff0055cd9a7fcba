"""GPU KV-cache sizing (runner/kv_cache.py) from the allocator's figures, faked here (the CPU
reports none): the oracle is the arithmetic of the sizing rule on the same figures."""
import jax.numpy as jnp
import pytest

from jaxserve.runner import kv_cache as kvc

MIB = 1 << 20
SPEC = kvc.KVCacheSpec(num_layers=4, num_kv_heads=2, head_dim=64, block_size=16, dtype=jnp.bfloat16)


class FakeDevice:
    def __init__(self, **stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


@pytest.fixture(autouse=True)
def _bfc_pool(monkeypatch):  # JAX's GPU default: one preallocated BFC pool at the memory fraction
    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.9")
    monkeypatch.delenv("XLA_PYTHON_CLIENT_PREALLOCATE", raising=False)
    monkeypatch.delenv("XLA_PYTHON_CLIENT_ALLOCATOR", raising=False)


def _blocks(free_bytes):
    return (free_bytes - 256 * MIB) // SPEC.bytes_per_block


def test_one_block_of_free_memory_is_sized_whole():
    dev = FakeDevice(bytes_limit=9000 * MIB, bytes_in_use=1000 * MIB, largest_free_block_bytes=8000 * MIB)
    assert kvc.num_blocks_for_accelerator(SPEC, dev, 0.9, 500 * MIB) == _blocks(7500 * MIB)


def test_free_memory_in_holes_counts_only_up_to_its_largest_block(monkeypatch):
    # 8000 MiB free, but the largest block is 5000 MiB: the rest lies between resident arrays
    dev = FakeDevice(bytes_limit=9000 * MIB, bytes_in_use=1000 * MIB, largest_free_block_bytes=5000 * MIB)
    assert kvc.num_blocks_for_accelerator(SPEC, dev, 0.9, 500 * MIB) == _blocks(4500 * MIB)
    # a lower utilization than the pool's fraction: the pool's tail past the cap is not the cache's
    cap = int(9000 * MIB / 0.9 * 0.8)
    assert kvc.num_blocks_for_accelerator(SPEC, dev, 0.8, 500 * MIB) == _blocks(
        min(cap - 1000 * MIB, 5000 * MIB - (9000 * MIB - cap)) - 500 * MIB)
    # where the figure means something else (a pool that grows, another allocator), it is not used
    for var, value in (("XLA_PYTHON_CLIENT_PREALLOCATE", "false"), ("XLA_PYTHON_CLIENT_ALLOCATOR", "platform")):
        monkeypatch.setenv(var, value)
        assert kvc.num_blocks_for_accelerator(SPEC, dev, 0.9, 500 * MIB) == _blocks(7500 * MIB)
        monkeypatch.delenv(var)
    assert kvc.contiguous_free_bytes({"bytes_limit": 1}) is None  # not reported
