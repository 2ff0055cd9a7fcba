"""Synthetic request sets: fixed lengths ("random") or a ShareGPT-like length distribution.

Prompts are random token ids (no tokenizer needed), so the same workload runs on dummy weights.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class BenchRequest:
    prompt_token_ids: list[int]
    output_len: int


def random_requests(num: int, input_len: int, output_len: int, vocab_size: int, seed: int = 0,
                    range_ratio: float = 0.0) -> list[BenchRequest]:
    """Lengths uniform in [len * (1 - range_ratio), len * (1 + range_ratio)]."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        li = max(1, int(rng.integers(int(input_len * (1 - range_ratio)), int(input_len * (1 + range_ratio)) + 1)))
        lo = max(1, int(rng.integers(int(output_len * (1 - range_ratio)), int(output_len * (1 + range_ratio)) + 1)))
        # Skip the lowest ids, where special tokens usually live.
        out.append(BenchRequest(rng.integers(min(1000, vocab_size // 2), vocab_size, li).tolist(), lo))
    return out


def sharegpt_like_requests(num: int, vocab_size: int, max_model_len: int, seed: int = 0) -> list[BenchRequest]:
    """Log-normal prompt/output lengths fitted to the ShareGPT conversations vLLM benchmarks use
    (median prompt ~ 220 tokens, median output ~ 180 tokens, long tails), clipped to fit."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(num):
        li = int(np.clip(rng.lognormal(np.log(220), 0.9), 4, max_model_len // 2))
        lo = int(np.clip(rng.lognormal(np.log(180), 0.8), 4, max_model_len - li - 1))
        out.append(BenchRequest(rng.integers(min(1000, vocab_size // 2), vocab_size, li).tolist(), lo))
    return out


def make_requests(dataset: str, num: int, input_len: int, output_len: int, vocab_size: int,
                  max_model_len: int, seed: int = 0, range_ratio: float = 0.0) -> list[BenchRequest]:
    if dataset == "random":
        return random_requests(num, input_len, output_len, vocab_size, seed, range_ratio)
    if dataset == "sharegpt-like":
        return sharegpt_like_requests(num, vocab_size, max_model_len, seed)
    raise ValueError(f"unknown dataset {dataset!r}; use random or sharegpt-like")
