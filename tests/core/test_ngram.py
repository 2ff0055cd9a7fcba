"""N-gram prompt lookup (core/ngram.py) against a brute-force search of the same rule."""
import random

import pytest

from jaxserve.core.ngram import NgramIndex


def brute(tokens, k, n_min, n_max):
    """The longest suffix (n_max..n_min tokens) that occurred earlier with a token after it; its
    latest such occurrence; the k tokens after it, repeating the period where they run out."""
    L = len(tokens)
    for n in range(min(n_max, L - 1), n_min - 1, -1):
        suffix = tokens[L - n:]
        for c in range(L - 1, n - 1, -1):  # c: the position after the occurrence, c < L
            if tokens[c - n:c] == suffix:
                out, seq = [], list(tokens)
                for j in range(k):
                    seq.append(seq[c + j])
                    out.append(seq[c + j])
                return out
    return []


@pytest.mark.parametrize("vocab,n_min,n_max", [(3, 1, 3), (5, 2, 4), (20, 2, 4), (2, 3, 5)])
def test_proposals_match_a_brute_force_search_as_the_sequence_grows(vocab, n_min, n_max):
    rng = random.Random(vocab * 100 + n_min)
    for _ in range(20):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 8))]
        idx = NgramIndex(n_min, n_max)
        for _ in range(40):  # the index is extended incrementally, as the scheduler uses it
            k = rng.randrange(1, 7)
            assert idx.propose(tokens, k) == brute(tokens, k, n_min, n_max), tokens
            tokens = tokens + [rng.randrange(vocab) for _ in range(rng.randrange(1, 4))]


def test_a_repeating_text_proposes_its_period():
    idx = NgramIndex(2, 4)
    assert idx.propose([7, 8, 9, 7, 8], 5) == [9, 7, 8, 9, 7]
    assert idx.propose([1, 2, 3, 4], 3) == []  # nothing repeats


def test_a_source_is_followed_in_order():
    """A prediction (source) is looked up before the sequence's own text, from one-token suffixes
    up, each time at the first occurrence at or after the previous proposal's start."""
    src = [5, 1, 2, 9, 1, 2, 7, 8]
    idx = NgramIndex(2, 4, source=src)
    assert idx.propose([3, 5], 3) == [1, 2, 9]  # "5" (one token) -> after position 0
    assert idx.propose([3, 5, 1, 2], 2) == [9, 1]  # "5 1 2": the longest match
    assert idx.propose([3, 5, 1, 2, 9, 1, 2], 2) == [7, 8]  # "2 9 1 2" at 2..5: continue at 6
    assert idx.propose([3, 1, 2], 2) == [7, 8]  # "1 2" occurs at 1 and 4: the one at or after the cursor
    assert NgramIndex(2, 4, source=src).propose([3, 1, 2], 2) == [9, 1]  # a fresh cursor takes the first
    assert idx.propose([3, 4], 2) == []  # in neither the source nor the text
