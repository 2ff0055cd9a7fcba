"""KV blocks: reference counts, the free list (an LRU of reusable cached blocks), hash -> block.

Block states (see docs/ARCHITECTURE.md):
  free, no hash       in the free list, evicted first
  free, cached        in the free list with its hash; a prefix hit takes it back (ref 0 -> 1)
  in use              ref_cnt >= 1 (shared by every sequence holding it); not in the free list
Block 0 is the null block: never in the free list, never handed out.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Hashable, Optional


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool = True):
        if num_blocks < 2:
            raise ValueError("need at least 2 blocks (block 0 is the null block)")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.ref_cnt = [0] * num_blocks
        self.block_hash: list[Optional[Hashable]] = [None] * num_blocks
        # Eviction order: first = next to be reused. Values unused.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[Hashable, int] = {}
        self.num_evictions = 0

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_usable(self) -> int:
        return self.num_blocks - 1

    def usage(self) -> float:
        return 1.0 - self.num_free / self.num_usable

    def allocate(self, n: int) -> list[int]:
        if n > len(self.free):
            raise RuntimeError(f"asked for {n} blocks, {len(self.free)} free")
        out = []
        for _ in range(n):
            bid, _ = self.free.popitem(last=False)
            h = self.block_hash[bid]
            if h is not None:  # evict: its content is about to be overwritten
                if self.cached.get(h) == bid:
                    del self.cached[h]
                self.block_hash[bid] = None
                self.num_evictions += 1
            self.ref_cnt[bid] = 1
            out.append(bid)
        return out

    def touch(self, block_ids: list[int]) -> None:
        """Take references on blocks found in the prefix cache (ref 0 ones leave the free list)."""
        for bid in block_ids:
            if self.ref_cnt[bid] == 0:
                del self.free[bid]
            self.ref_cnt[bid] += 1

    def free_blocks(self, block_ids: list[int]) -> None:
        """Drop one reference each. Pass a sequence's blocks in reverse order: its tail blocks
        then sit ahead of its head blocks in the LRU, so shared prefixes are evicted last."""
        for bid in block_ids:
            self.ref_cnt[bid] -= 1
            assert self.ref_cnt[bid] >= 0, bid
            if self.ref_cnt[bid] == 0:
                self.free[bid] = None
                if self.block_hash[bid] is None:
                    self.free.move_to_end(bid, last=False)  # nothing worth keeping: reuse first

    def lookup(self, h: Hashable) -> Optional[int]:
        return self.cached.get(h) if self.enable_caching else None

    def cache(self, bid: int, h: Hashable) -> None:
        """Register a full, computed block under its hash (first writer wins)."""
        if not self.enable_caching or self.block_hash[bid] is not None:
            return
        if h in self.cached:
            return
        self.cached[h] = bid
        self.block_hash[bid] = h

    def reset_prefix_cache(self) -> bool:
        """Forget every cached block (all must be free: a held block's hash is still in use);
        False, with nothing changed, if any block is held."""
        if len(self.free) != self.num_blocks - 1:
            return False
        self.cached.clear()
        self.block_hash = [None] * self.num_blocks
        return True

    def num_cached_free(self) -> int:
        return sum(1 for b in self.free if self.block_hash[b] is not None)
