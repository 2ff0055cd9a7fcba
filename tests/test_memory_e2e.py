"""Prefix caching and preemption on the real model: outputs identical to the plain run (greedy)."""
import logging

import pytest

from jaxserve import LLM, SamplingParams

SYSTEM = ("You are a meticulous assistant. Answer briefly and precisely, cite no sources, and never "
          "apologise. Keep every answer under three sentences. ") * 3
QUESTIONS = ["What is the boiling point of water?", "Name a prime number.", "What colour is the sky?",
             "Who wrote Hamlet?", "What is two plus two?", "Name a planet.", "What is the capital of Italy?",
             "Name an ocean."]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
COMMON = dict(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, seed=0)


@pytest.fixture(scope="module")
def reference():
    llm = LLM(enable_prefix_caching=False, warmup=False, **COMMON)
    outs = llm.generate([SYSTEM + q for q in QUESTIONS], GREEDY, use_tqdm=False)
    return llm, [o.outputs[0].token_ids for o in outs]


def test_prefix_caching_identical_and_reports_hits(reference):
    _, ref = reference
    llm = LLM(enable_prefix_caching=True, warmup=False, **COMMON)
    first = llm.generate(SYSTEM + QUESTIONS[0], GREEDY, use_tqdm=False)[0]
    assert first.outputs[0].token_ids == ref[0]
    rest = llm.generate([SYSTEM + q for q in QUESTIONS[1:]], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in rest] == ref[1:]
    assert len(first.prompt_token_ids) > 64
    assert all(o.num_cached_tokens >= 64 for o in rest)
    stats = llm.get_stats()
    assert stats.prefix_cache_hits >= 64 * len(rest)
    assert llm.llm_engine.scheduler.kv_usage() == 0.0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_preemption_gives_identical_outputs(reference, mode, caplog):
    _, ref = reference
    # 20 blocks x 16 = 304 usable tokens for 8 sequences of ~60-90 tokens: preemption is forced
    # (admission without headroom: every prompt that fits now is admitted).
    # swap_space: a 0.25 GiB host pool (364 blocks) holds every preempted sequence; the default 4 GiB
    # took 10 s to fault in (and needs 4 GiB of free host memory)
    llm = LLM(enable_prefix_caching=False, warmup=False, num_gpu_blocks_override=20, preemption_mode=mode,
              admission_headroom_tokens=0, swap_space=0.25, **COMMON)
    with caplog.at_level(logging.WARNING, logger="jaxserve"):
        outs = llm.generate([SYSTEM + q for q in QUESTIONS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.get_stats().num_preemptions_total > 0
    assert llm.llm_engine.scheduler.kv_usage() == 0.0
    # the user is told once (a minute at most), with the cache's size and what to change
    warned = [r.getMessage() for r in caplog.records if "preempted" in r.getMessage()]
    assert len(warned) == 1 and f"({mode}:" in warned[0] and "holds 304 tokens" in warned[0]
    assert "kv_cache_dtype='fp8'" in warned[0] and "max_num_seqs (now 8)" in warned[0]


def test_admission_headroom_avoids_the_preemptions(reference, caplog):
    """The same tight cache with the default admission headroom: prompts wait until the running
    sequences' remaining tokens fit, so nothing is preempted (and nothing warns), and the outputs
    are the same."""
    _, ref = reference
    llm = LLM(enable_prefix_caching=False, warmup=False, num_gpu_blocks_override=20, **COMMON)
    with caplog.at_level(logging.WARNING, logger="jaxserve"):
        outs = llm.generate([SYSTEM + q for q in QUESTIONS], GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == ref
    assert llm.get_stats().num_preemptions_total == 0
    assert not [r for r in caplog.records if "preempted" in r.getMessage()]
    assert llm.llm_engine.scheduler.kv_usage() == 0.0
