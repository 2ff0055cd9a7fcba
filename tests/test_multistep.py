"""Decode blocks: multi-step decoding (num_scheduler_steps: K decode steps per scheduler round
trip, sampled tokens fed back on the device) and async scheduling (the next block dispatched
before the previous one's tokens are back). Oracle: the same engine with single synchronous
steps; seeded sampling makes every configuration's tokens comparable exactly."""
import dataclasses

import pytest

from jaxserve import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
           "The quick brown fox", "1, 2, 3,"]
# (num_scheduler_steps, async_scheduling); the first is the oracle
CONFIGS = ((1, False), (1, True), (4, False), (4, True))


def _params():
    out = []
    for i in range(len(PROMPTS)):
        # lengths that end inside a K=4 window, EOS allowed on some, seeded sampling on others
        out.append(SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, seed=100 + i, max_tokens=[3, 9, 14, 21, 6, 17][i],
                                  ignore_eos=i % 3 == 0))
    return out


@pytest.fixture(scope="module")
def llm():
    # One engine (compiled with both features on), its scheduler switched between configurations.
    # 16 sequence rows: the smallest token bucket's (16) decode steps have one row per token, as
    # the engine's default geometry does (a block's samples are then the next block's token ids).
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64,
               num_scheduler_steps=4, async_scheduling=True, cpu_kv_cache_gib=0.1)


@pytest.fixture(scope="module")
def results(llm):
    eng = llm.llm_engine
    base = eng.scheduler.cfg
    compiles = eng.runner.num_compilations()
    res = {}
    for k, asyn in CONFIGS:
        eng.scheduler.cfg = dataclasses.replace(base, num_scheduler_steps=k, async_scheduling=asyn)
        assert eng.reset_prefix_cache()
        steps0, async0 = eng.get_stats().num_steps, eng.scheduler.num_async_blocks
        outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
        # a request with a stop string takes one-step blocks, or single steps next to multi-step ones
        mixed = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=12, stop=["\n"]),
                                           SamplingParams(temperature=0, max_tokens=12)], use_tqdm=False)
        res[k, asyn] = dict(tokens=[o.outputs[0].token_ids for o in outs], text=[o.outputs[0].text for o in outs],
                            finish=[o.outputs[0].finish_reason for o in outs], mixed=[o.outputs[0].text for o in mixed],
                            kv=eng.scheduler.kv_usage(), steps=eng.get_stats().num_steps - steps0,
                            async_blocks=eng.scheduler.num_async_blocks - async0)
    res["new_compiles"] = eng.runner.num_compilations() - compiles
    return res


@pytest.mark.parametrize("config", CONFIGS[1:])
def test_decode_blocks_give_the_single_step_tokens(results, config):
    oracle, r = results[CONFIGS[0]], results[config]
    assert r["tokens"] == oracle["tokens"]
    assert r["text"] == oracle["text"]
    assert r["finish"] == oracle["finish"]
    assert r["mixed"] == oracle["mixed"]
    assert [len(t) for t in r["tokens"]][::3] == [3, 21]  # ignore_eos rows run to max_tokens
    assert r["kv"] == 0.0  # every block freed, including those of blocks dropped after a stop


def test_async_blocks_ran_and_nothing_compiled(results):
    assert results[1, True]["async_blocks"] > 0 and results[4, True]["async_blocks"] > 0
    assert results[1, False]["async_blocks"] == 0 and results[4, False]["async_blocks"] == 0
    assert results[4, False]["steps"] < results[1, False]["steps"]
    assert results["new_compiles"] == 0


def test_multistep_is_validated():
    from jaxserve.config import SchedulerConfig

    with pytest.raises(ValueError, match="num_scheduler_steps must be in"):
        SchedulerConfig(num_scheduler_steps=0)


def test_abort_while_a_block_is_on_the_device(results):
    """Aborting a request whose next block is already dispatched: the others' tokens are
    unchanged, the aborted one reports 'abort', and every KV block comes back."""
    llm = LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
              num_scheduler_steps=4, async_scheduling=True, cpu_kv_cache_gib=0.1)
    eng = llm.llm_engine
    params = _params()
    for i, (p, sp) in enumerate(zip(PROMPTS, params)):
        eng.add_request(f"q{i}", p, sp)
    done, aborted = {}, False
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        if not aborted and eng._inflight is not None and "q3" not in done:
            eng.abort_request("q3")  # q3 (21 tokens) is in the block on the device
            aborted = True
    assert aborted and done["q3"].outputs[0].finish_reason == "abort"
    oracle = results[CONFIGS[0]]["tokens"]
    for i in (0, 1, 2, 4, 5):
        assert done[f"q{i}"].outputs[0].token_ids == oracle[i]
    assert eng._inflight is None and eng.scheduler.kv_usage() == 0.0


@pytest.mark.parametrize("config", [(1, False), (4, True)])
def test_trace_summary_accounts_for_every_token(llm, results, config):
    """summarize_trace (the benchmark's timeline) splits a run into prefill and decode steps; its
    token counts must add up to what the requests computed: prompt + output - 1 per request
    (exactly with single steps; a K-step block also computes the padding steps of rows that
    finished inside it, so at least that)."""
    import time

    from jaxserve.engine.trace import summarize_trace

    eng = llm.llm_engine
    k, asyn = config
    eng.scheduler.cfg = dataclasses.replace(eng.scheduler.cfg, num_scheduler_steps=k, async_scheduling=asyn)
    assert eng.reset_prefix_cache()
    max_tokens = [5, 11, 3, 8]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in max_tokens]
    eng.trace = []
    t0 = time.time()
    try:
        outs = llm.generate(PROMPTS[:4], params, use_tqdm=False)
    finally:
        trace, eng.trace = eng.trace, None
    summ = summarize_trace(trace, start_time=t0, max_num_seqs=8)
    computed = sum(len(o.prompt_token_ids) + len(o.outputs[0].token_ids) - 1 for o in outs)
    counted = summ["prefill"]["tokens"] + sum(d["tokens"] for d in summ["decode"].values())
    assert counted == computed if k == 1 else computed <= counted <= computed + 4 * (k - 1)
    assert summ["prefill"]["steps"] >= 1 and summ["decode"]["low"]["steps"] > 0
    steps = summ["prefill"]["steps"] + sum(d["steps"] for d in summ["decode"].values())
    assert steps == sum(r["num_steps"] for r in trace)
    assert abs(summ["wall_s"] - (trace[-1]["time"] - t0)) < 1e-6
    assert summ["preemptions"] == 0


def test_steady_decode_skips_the_feed_and_the_sampling_transfer(llm, results, monkeypatch):
    """Async blocks over a batch that does not change: each block takes the previous block's samples
    as its token ids (no feed program) and the sampling array already on the device (only the
    counters go over); the tokens are the synchronous single steps'."""
    from jaxserve.runner import model_runner as mr

    eng = llm.llm_engine
    runner, base = eng.runner, eng.scheduler.cfg
    prompts = PROMPTS[1:3]
    params = [SamplingParams(temperature=0.8, seed=7 + i, max_tokens=12, ignore_eos=True) for i in range(2)]
    outs = {}
    try:
        for k, asyn in ((1, False), (1, True)):
            eng.scheduler.cfg = dataclasses.replace(base, num_scheduler_steps=k, async_scheduling=asyn)
            assert eng.reset_prefix_cache()
            calls = {"feed_rows": 0, "sampling_puts": 0}
            feed_rows, on_device = mr.feed_rows, runner._on_device

            def counted_feed(*a):
                calls["feed_rows"] += 1
                return feed_rows(*a)

            def counted_put(*a):
                calls["sampling_puts"] += 1
                return on_device(*a)
            monkeypatch.setattr(mr, "feed_rows", counted_feed)
            monkeypatch.setattr(runner, "_on_device", counted_put)
            blocks0 = eng.scheduler.num_async_blocks
            outs[asyn] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
            outs[asyn, "blocks"] = eng.scheduler.num_async_blocks - blocks0
            outs[asyn, "calls"] = dict(calls)
            monkeypatch.undo()
    finally:
        eng.scheduler.cfg = base
    assert outs[True] == outs[False] and all(len(t) == 12 for t in outs[True])
    assert outs[True, "blocks"] >= 8
    assert outs[True, "calls"]["feed_rows"] == 0
    # the prefill step's sampling array, then the decode blocks' one (same values every block)
    assert outs[True, "calls"]["sampling_puts"] <= 2 < outs[True, "blocks"]
