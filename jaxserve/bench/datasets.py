"""Request sets: fixed lengths ("random"), a ShareGPT-like length distribution ("sharegpt-like"),
both random token ids that need no tokenizer (so they run on dummy weights), or the
conversations of a ShareGPT-format JSON file ("sharegpt" with a dataset path, as vLLM's
benchmarks use: each conversation's first turn is the prompt, the reply's length in tokens the
output length).
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

logger = logging.getLogger("jaxserve")
DATASETS = ("random", "sharegpt-like", "sharegpt")


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


def sharegpt_requests(path: str, num: int, tokenizer: Any, max_model_len: int, seed: int = 0,
                      output_len: Optional[int] = None) -> list[BenchRequest]:
    """`num` conversations of a ShareGPT-format JSON file (a list of {"conversations": [{"from":
    "human", "value": ...}, {"from": "gpt", "value": ...}, ...]}; "role"/"content" keys and
    "user"/"assistant" speakers are read too), in an order shuffled by `seed`: the first turn's
    tokens are the prompt, the second turn's token count the output length (or `output_len`).
    Pairs under 4 tokens either way, or longer together than max_model_len, are skipped (vLLM's
    filter, with the engine's limit)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read the dataset {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}); --dataset sharegpt reads a ShareGPT-format JSON list") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of conversations, got {type(data).__name__}")
    pairs = []
    for entry in data:
        turns = entry.get("conversations") or entry.get("messages") if isinstance(entry, dict) else None
        if not isinstance(turns, list) or len(turns) < 2:
            continue
        texts = [t.get("value", t.get("content")) if isinstance(t, dict) else None for t in turns[:2]]
        if all(isinstance(x, str) for x in texts):
            pairs.append(texts)
    if not pairs:
        raise ValueError(f"{path}: no conversation with two text turns (ShareGPT format: "
                         f'[{{"conversations": [{{"from": "human", "value": ...}}, {{"from": "gpt", "value": ...}}]}}])')
    order = np.random.default_rng(seed).permutation(len(pairs))
    out = []
    for i in order:
        prompt, reply = pairs[i]
        ids = list(tokenizer.encode(prompt))
        n_out = output_len if output_len is not None else len(tokenizer.encode(reply, add_special_tokens=False))
        if len(ids) < 4 or n_out < 4 or len(ids) + n_out > max_model_len:
            continue
        out.append(BenchRequest(ids, n_out))
        if len(out) == num:
            break
    if not out:
        raise ValueError(f"{path}: none of its {len(pairs)} conversations fits (>= 4 tokens each way, "
                         f"prompt + output <= max_model_len={max_model_len})")
    if len(out) < num:
        logger.warning("%s: only %d of the %d requests asked for fit; running %d", path, len(out), num, len(out))
    return out


def check_dataset(dataset: str, dataset_path: Optional[str]) -> None:
    """The dataset settings' errors, raised before anything slow (an engine's start-up) runs."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; use one of {', '.join(DATASETS)}")
    if dataset_path is not None and dataset != "sharegpt":
        raise ValueError(f"--dataset-path is read by --dataset sharegpt, not {dataset!r}")
    if dataset == "sharegpt":
        if dataset_path is None:
            raise ValueError("--dataset sharegpt needs --dataset-path FILE (a ShareGPT-format JSON file); "
                             "without one, --dataset sharegpt-like draws lengths from the same distribution")
        if not os.path.isfile(dataset_path):
            raise ValueError(f"--dataset-path {dataset_path}: no such file")


def make_requests(dataset: str, num: int, input_len: int, output_len: int, vocab_size: int,
                  max_model_len: int, seed: int = 0, range_ratio: float = 0.0, *,
                  dataset_path: Optional[str] = None, tokenizer: Any = None,
                  fixed_output_len: Optional[int] = None) -> list[BenchRequest]:
    """dataset_path / tokenizer: the file and the tokenizer "sharegpt" needs (fixed_output_len
    overrides its replies' lengths)."""
    check_dataset(dataset, dataset_path)
    if dataset == "random":
        return random_requests(num, input_len, output_len, vocab_size, seed, range_ratio)
    if dataset == "sharegpt-like":
        return sharegpt_like_requests(num, vocab_size, max_model_len, seed)
    if dataset == "sharegpt":
        if tokenizer is None:
            raise ValueError("--dataset sharegpt needs the model's tokenizer to count tokens (bench serve: --tokenizer)")
        return sharegpt_requests(dataset_path, num, tokenizer, max_model_len, seed, fixed_output_len)
    raise AssertionError(dataset)  # check_dataset refused it
