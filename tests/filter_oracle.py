"""The numpy oracle of the sampler's top-k / top-p / min-p kept sets (float64 sums)."""
import numpy as np


def kept_by_sort(x, top_k, top_p, min_p, temperature=1.0):
    """Sort the row; keep the k largest (and ties), the fewest largest whose probability mass
    reaches top_p (and ties; float64 sums of softmax(x / temperature)), and min-p. None where the
    top-p cut is within float32 rounding of the target (either answer is right)."""
    v = x.size
    order = np.sort(x)[::-1]
    kth = order[min(top_k, v) - 1] if top_k > 0 else -np.inf
    p = np.exp((x.astype(np.float64) - x.max()) / temperature)
    p /= p.sum()
    ps = np.sort(p)[::-1]
    before = np.cumsum(ps) - ps
    if top_p < 1 and np.min(np.abs(before - top_p)) < 1e-5:
        return None
    n = max(int(np.sum(before < top_p)), 1) if top_p < 1 else v
    pth = order[n - 1]
    return (x >= kth) & (x >= pth) & (p >= min_p * p.max()) & (x > -np.inf)


def random_filter_batch(rng, rows, vocab):
    """Logits with ties (including -0.0 next to 0.0), banned (-inf) tokens and negative values,
    and per-row top_k (off, 1, past the vocabulary, ...), top_p, min_p, temperature."""
    x = (rng.standard_normal((rows, vocab)) * rng.uniform(0.3, 4, (rows, 1))).astype(np.float32)
    x[::3] = np.round(x[::3] * 2) / 2
    x[1::4, rng.integers(0, vocab, 5)] = -np.inf
    top_k = rng.choice([0, 1, 2, 7, vocab // 3, vocab, vocab + 5], rows).astype(np.int32)
    top_p = rng.choice([1.0, 0.05, 0.5, 0.9, 0.999], rows).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.1], rows).astype(np.float32)
    temperature = rng.choice([1.0, 0.7, 1.5], rows).astype(np.float32)
    return x, top_k, top_p, min_p, temperature
