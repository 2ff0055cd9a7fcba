"""N-gram prompt lookup: the draft "model" of speculative decoding with speculative_model="[ngram]".

A sequence's last n tokens (n from the longest lookup down to the shortest) are looked up among
its earlier tokens, prompt and output alike; the tokens that followed their most recent earlier
occurrence are the proposal. The index is built once per sequence and extended as tokens arrive,
so a proposal costs a few dict lookups, not a scan of the context. Pure Python (core/).

A request may also bring a `source`: the output it expects (OpenAI's Predicted Outputs, e.g. the
file being edited). It is looked up first, its suffixes from 1 token up, and its occurrences are
taken in order (the first at or after where the last proposal came from), so a prediction is
followed along rather than jumped about in.
"""
from __future__ import annotations

import bisect
from typing import Optional


class NgramIndex:
    """For each n in [n_min, n_max]: n-gram -> the position right after its latest occurrence
    that has a token after it (so the sequence's own suffix never matches itself)."""

    def __init__(self, n_min: int, n_max: int, source: Optional[list[int]] = None):
        self.n_min, self.n_max = n_min, n_max
        self._after: dict[int, dict[tuple, int]] = {n: {} for n in range(n_min, n_max + 1)}
        self._next = 1  # positions c < _next are registered as continuations
        self._src = list(source) if source else None
        # source n-gram -> every position right after one of its occurrences, ascending
        self._src_at: dict[int, dict[tuple, list[int]]] = {n: {} for n in range(1, n_max + 1)}
        self._cursor = 0  # where the last proposal from the source started
        for c in range(1, len(self._src or ())):
            for n, table in self._src_at.items():
                if c >= n:
                    table.setdefault(tuple(self._src[c - n:c]), []).append(c)

    def _extend(self, tokens: list[int]) -> None:
        for c in range(self._next, len(tokens)):
            for n, table in self._after.items():
                if c >= n:
                    table[tuple(tokens[c - n:c])] = c
        self._next = max(self._next, len(tokens))

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to k tokens likely to follow `tokens` (the sequence so far, which only ever grows),
        or [] when no suffix of n_min..n_max tokens occurred before. A match whose continuation
        runs into the end of the sequence repeats its period (the text between the occurrence and
        the end): "a b c a b c a b" proposes "c a b c ..."."""
        self._extend(tokens)
        L = len(tokens)
        if self._src is not None:
            for n in range(min(self.n_max, L), 0, -1):
                at = self._src_at[n].get(tuple(tokens[L - n:]))
                if at:
                    i = bisect.bisect_left(at, self._cursor)
                    c = at[i] if i < len(at) else at[-1]
                    self._cursor = c
                    return self._src[c:c + k]
        for n in range(min(self.n_max, L - 1), self.n_min - 1, -1):
            c = self._after[n].get(tuple(tokens[L - n:]))
            if c is None:
                continue
            period = L - c
            return [tokens[c + j] if c + j < L else tokens[c + (j % period)] for j in range(k)]
        return []
