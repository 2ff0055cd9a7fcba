"""Allocate / free / prefix lookup for sequences, all counted in tokens.

Prefix caching: full blocks are keyed by a hash chain h_i = hash((h_{i-1}, tokens of block i,
extra keys)), so a block's key names its whole prefix. A new sequence reuses every cached full
block of its prompt, except that the last prompt token is always computed (its logits are needed).
"""
from __future__ import annotations

import hashlib
import pickle
from typing import Optional

from jaxserve.core.block_pool import BlockPool
from jaxserve.core.request import Sequence


def hash_block(parent: Optional[bytes], token_ids: tuple, extra: Optional[tuple] = None) -> bytes:
    """Stable across processes (sha256), so routing by prefix across replicas can use it too."""
    return hashlib.sha256(pickle.dumps((parent, token_ids, extra), protocol=4)).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.enable_caching = enable_caching
        self.prefix_queries = 0  # prompt tokens looked up
        self.prefix_hits = 0  # of which found in the cache

    # ---- hashing ----------------------------------------------------------------------------
    def _update_hashes(self, seq: Sequence) -> list:
        bs = self.block_size
        hashes = seq.block_hashes
        n_full = seq.num_tokens // bs
        while len(hashes) < n_full:
            i = len(hashes)
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, tuple(seq.token_ids[i * bs:(i + 1) * bs])))
        return hashes

    # ---- prefix lookup ----------------------------------------------------------------------
    def get_computed_blocks(self, seq: Sequence) -> list[int]:
        """Cached blocks for the longest cached prefix of seq's tokens (at most num_tokens - 1)."""
        if not self.enable_caching or seq.request.params.prompt_logprobs is not None:
            return []
        hashes = self._update_hashes(seq)
        limit = (seq.num_tokens - 1) // self.block_size
        out = []
        for h in hashes[:limit]:
            bid = self.pool.lookup(h)
            if bid is None:
                break
            out.append(bid)
        return out

    def record_query(self, num_tokens: int, num_hit: int) -> None:
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit

    # ---- allocation -------------------------------------------------------------------------
    def blocks_needed(self, seq: Sequence, num_new_tokens: int, computed: Optional[list[int]] = None) -> int:
        if not computed:  # the hot path (every running sequence, every step)
            need = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size) - len(seq.block_ids)
            return need if need > 0 else 0
        have = len(seq.block_ids) + len(computed or [])
        total = -(-(seq.num_computed_tokens + num_new_tokens + len(computed or []) * self.block_size)
                  // self.block_size)
        return max(total - have, 0)

    def can_allocate(self, seq: Sequence, num_new_tokens: int, computed: Optional[list[int]] = None,
                     spare: int = 0) -> bool:
        """spare: blocks to count as free beyond the pool's (negative: already spoken for)."""
        # Cached hits that sit in the free list stop being free once touched.
        reclaimed = sum(1 for b in (computed or []) if self.pool.ref_cnt[b] == 0)
        return self.blocks_needed(seq, num_new_tokens, computed) <= self.pool.num_free - reclaimed + spare

    def allocate(self, seq: Sequence, num_new_tokens: int, computed: Optional[list[int]] = None) -> bool:
        """Grow seq's block table to hold num_computed + len(computed)*bs + num_new tokens.
        Returns False (and changes nothing) when the free blocks don't suffice."""
        need = self.blocks_needed(seq, num_new_tokens, computed)
        if not computed:  # the decode path: most steps need no new block
            if need > self.pool.num_free:
                return False
            if need:
                seq.block_ids.extend(self.pool.allocate(need))
            return True
        if not self.can_allocate(seq, num_new_tokens, computed):
            return False
        if computed:
            self.pool.touch(computed)
            seq.block_ids.extend(computed)
            seq.num_computed_tokens += len(computed) * self.block_size
        seq.block_ids.extend(self.pool.allocate(need))
        return True

    def cache_computed(self, seq: Sequence) -> None:
        """Register the sequence's full, computed blocks in the prefix cache."""
        if not self.enable_caching:
            return
        n = min(seq.num_computed_tokens // self.block_size, len(seq.block_ids))
        if n <= seq.num_registered_blocks:  # no block filled up since the last call
            return
        hashes = self._update_hashes(seq)
        n = min(n, len(hashes))
        for i in range(seq.num_registered_blocks, n):
            self.pool.cache(seq.block_ids[i], hashes[i])
        seq.num_registered_blocks = n

    def free(self, seq: Sequence) -> None:
        self.pool.free_blocks(list(reversed(seq.block_ids)))
        seq.block_ids = []
        seq.num_registered_blocks = 0

    def usage(self) -> float:
        return self.pool.usage()
