"""scripts/bench_filter_radix.py's filters (the sampler's sort path, and the radix search's XLA
form as the sampler applies it) against the numpy oracle of the kept sets."""
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_filter_radix  # noqa: E402

from tests.filter_oracle import kept_by_sort, random_filter_batch  # noqa: E402


@pytest.mark.parametrize("vocab", [64, 1000, 49152])
def test_filters_keep_what_sorting_keeps(vocab):
    """Ties (including -0.0 against 0.0), banned (-inf) tokens, negative logits, each filter alone
    and combined, top_k past the vocabulary."""
    rng = np.random.default_rng(vocab)
    rows = 24 if vocab < 10000 else 6
    x, top_k, top_p, min_p, _ = random_filter_batch(rng, rows, vocab)
    args = tuple(jnp.asarray(a) for a in (x, top_k, top_p, min_p))
    engine = np.asarray(bench_filter_radix.filtered_sort(*args)) > -np.inf
    radix = {b: np.asarray(bench_filter_radix.filtered_xla(*args, bits=b)) > -np.inf for b in (1, 4)}
    checked = 0
    for i in range(rows):
        want = kept_by_sort(x[i], int(top_k[i]), float(top_p[i]), float(min_p[i]))
        if want is None:
            continue
        checked += 1
        why = f"row {i}: top_k {top_k[i]} top_p {top_p[i]} min_p {min_p[i]}"
        np.testing.assert_array_equal(engine[i], want, err_msg="engine " + why)
        for b, got in radix.items():
            np.testing.assert_array_equal(got[i], want, err_msg=f"radix {b} " + why)
    assert checked >= rows - 2
