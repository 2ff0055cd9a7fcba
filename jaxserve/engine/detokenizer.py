"""Incremental detokenization and stop strings.

Text grows by decoding a short window of tokens twice (with and without the newest ones) and
taking the difference, so a multi-byte character split over tokens is emitted only once complete
(no U+FFFD in the stream). Stop strings are searched only in the newly reachable tail; while a
sequence runs, the last (longest stop - 1) characters are held back so a stream never shows the
start of a stop string that later matches.
"""
from __future__ import annotations

from typing import Optional

_PROMPT_CONTEXT = 4  # prompt tokens used as left context (leading-space handling of SentencePiece)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int], *, skip_special_tokens: bool = True,
                 spaces_between_special_tokens: bool = True, stop: Optional[list[str]] = None,
                 include_stop_str_in_output: bool = False, lazy: bool = False):
        """lazy: nobody reads the text before the end and there are no stop strings, so tokens are
        only collected and decoded in one go when the text is asked for (saves two decodes per
        token on the host)."""
        self.tokenizer = tokenizer
        self.skip_special = skip_special_tokens
        self.spaces_between = spaces_between_special_tokens
        ctx = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._ids = ctx
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self.text = ""  # full decoded output text (after stop-string truncation)
        self.stop = list(stop or [])
        self.include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in self.stop), default=1) - 1
        self._lazy = lazy and not self.stop
        self._pending: list[int] = []

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special,
                                     spaces_between_special_tokens=self.spaces_between)

    def add_tokens(self, new_ids: list[int], final: bool = False) -> Optional[str]:
        """Append tokens; returns the stop string that matched (text then truncated), else None."""
        if self._lazy:
            self._pending.extend(new_ids)
            if not final:
                return None
            new_ids, self._pending = self._pending, []
        self._ids.extend(new_ids)
        prefix = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full = self._decode(self._ids[self._prefix_offset:])
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            delta = full[len(prefix):]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self._ids)
        else:
            delta = ""
        if not delta:
            return None
        old_len = len(self.text)
        self.text += delta
        return self._check_stop(old_len)

    def _check_stop(self, old_len: int) -> Optional[str]:
        best = None
        for s in self.stop:
            start = max(0, old_len - len(s) + 1)
            i = self.text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        if best is None:
            return None
        i, s = best
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        return s

    def visible_text(self, finished: bool) -> str:
        """What a client may see now: everything when finished, else all but the held-back tail."""
        if self._pending:
            self.add_tokens([], final=finished)
        if finished or self._holdback == 0:
            return self.text
        return self.text[: max(0, len(self.text) - self._holdback)]


def decode_token(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id], skip_special_tokens=False)
