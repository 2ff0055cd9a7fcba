"""The sampler's top-k / top-p / min-p filter, the engine's (a sort per row) and the radix-search
probe of scripts/bench_filter_radix.py, against a numpy oracle of the kept sets."""
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_filter_radix  # noqa: E402


def _kept_by_sort(x, top_k, top_p, min_p):
    """Sort the row; keep the k largest (and ties), the fewest largest whose probability mass
    reaches top_p (and ties; float64 sums), and min-p. None where the top-p cut is within float32
    rounding of the target (either answer is right)."""
    v = x.size
    order = np.sort(x)[::-1]
    kth = order[min(top_k, v) - 1] if top_k > 0 else -np.inf
    p = np.exp(x.astype(np.float64) - x.max())
    p /= p.sum()
    ps = np.sort(p)[::-1]
    before = np.cumsum(ps) - ps
    if top_p < 1 and np.min(np.abs(before - top_p)) < 1e-5:
        return None
    n = max(int(np.sum(before < top_p)), 1) if top_p < 1 else v
    pth = order[n - 1]
    return (x >= kth) & (x >= pth) & (p >= min_p * p.max()) & (x > -np.inf)


@pytest.mark.parametrize("vocab", [64, 1000, 49152])
def test_filters_keep_what_sorting_keeps(vocab):
    """Ties (including -0.0 against 0.0), banned (-inf) tokens, negative logits, each filter alone
    and combined, top_k past the vocabulary."""
    rng = np.random.default_rng(vocab)
    rows = 24 if vocab < 10000 else 6
    x = (rng.standard_normal((rows, vocab)) * rng.uniform(0.3, 4, (rows, 1))).astype(np.float32)
    x[::3] = np.round(x[::3] * 2) / 2  # many ties, and -0.0 next to 0.0
    x[1::4, rng.integers(0, vocab, 5)] = -np.inf
    top_k = rng.choice([0, 1, 2, 7, vocab // 3, vocab, vocab + 5], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.05, 0.5, 0.9, 0.999], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.1], rows).astype(np.float32)
    args = tuple(jnp.asarray(a) for a in (x, top_k, top_p, min_p))
    engine = np.asarray(bench_filter_radix.filtered_sort(*args)) > -np.inf
    radix = {(b, impl): np.asarray(bench_filter_radix.filtered_radix(*args, bits=b, impl=impl)) > -np.inf
             for b, impl in ((1, "broadcast"), (4, "broadcast"), (4, "loop"))}
    checked = 0
    for i in range(rows):
        want = _kept_by_sort(x[i], int(top_k[i]), float(top_p[i]), float(min_p[i]))
        if want is None:
            continue
        checked += 1
        why = f"row {i}: top_k {top_k[i]} top_p {top_p[i]} min_p {min_p[i]}"
        np.testing.assert_array_equal(engine[i], want, err_msg="engine " + why)
        for b, got in radix.items():
            np.testing.assert_array_equal(got[i], want, err_msg=f"radix {b} " + why)
    assert checked >= rows - 2
