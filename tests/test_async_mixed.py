"""Async scheduling after prefill / mixed steps (Scheduler.schedule_next_step): the step after a
step that carries prompt chunks is scheduled and dispatched while that step runs, its continuing
rows taking that step's samples on the device. Oracle: the same engine with async scheduling off; seeded
sampling makes the tokens comparable exactly."""
import dataclasses

import pytest

from jaxserve import LLM, SamplingParams

BASE = "In the beginning of the long and winding story of the little town by the river, there lived"
PROMPTS = [BASE + " a baker", "Hi", BASE + " a smith who", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5, 6, 7,",
           "The capital of France is", BASE + " a smith who", "Water boils at a temperature of"]


def _params(i):
    kw = dict(temperature=0.0 if i % 2 == 0 else 0.9, seed=7 + i, max_tokens=[5, 12, 9, 20, 3, 15, 9, 11][i],
              ignore_eos=i % 3 == 0)
    if i == 5:
        kw["stop"] = ["."]  # a stop string: the sequence ends on the host after the step
    if i == 3:
        kw["min_tokens"] = 6  # EOS banned for the first tokens (the ban moves with the pending token)
    if i == 7:
        kw["n"] = 2  # siblings sharing the prompt's blocks
    return SamplingParams(**kw)


@pytest.fixture(scope="module")
def runs():
    # A 16-token budget over 4 sequences: prompts arrive in chunks next to running decodes.
    llm = LLM(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16,
              async_scheduling=True, cpu_kv_cache_gib=0.1)
    eng = llm.llm_engine
    base = eng.scheduler.cfg
    compiles = eng.runner.num_compilations()
    fed, pending_tokens = [], eng.runner._pending_tokens

    def counting(so, inp, prev):  # steps whose continuing rows took their tokens on the device
        tokens = pending_tokens(so, inp, prev)
        fed.append((so.decode_block, tokens is not None))
        return tokens
    eng.runner._pending_tokens = counting
    out = {}
    for asyn in (False, True):
        eng.scheduler.cfg = dataclasses.replace(base, async_scheduling=asyn)
        assert eng.reset_prefix_cache()
        m0 = eng.scheduler.num_async_mixed
        res = llm.generate(PROMPTS, [_params(i) for i in range(len(PROMPTS))], use_tqdm=False)
        # logprobs requests need their tokens before the next step: those steps stay synchronous
        lp = llm.generate(PROMPTS[:3], SamplingParams(temperature=0, max_tokens=6, logprobs=2), use_tqdm=False)
        out[asyn] = dict(tokens=[[c.token_ids for c in o.outputs] for o in res],
                         text=[[c.text for c in o.outputs] for o in res],
                         finish=[[c.finish_reason for c in o.outputs] for o in res],
                         lp=[(o.outputs[0].token_ids, [sorted(d) for d in o.outputs[0].logprobs]) for o in lp],
                         mixed=eng.scheduler.num_async_mixed - m0, kv=eng.scheduler.kv_usage(),
                         fed=sorted(set(f for f in fed if f[1])))
        fed.clear()
    out["new_compiles"] = eng.runner.num_compilations() - compiles
    return out


def test_mixed_steps_scheduled_ahead_give_the_synchronous_tokens(runs):
    sync, asyn = runs[False], runs[True]
    assert asyn["mixed"] > 5 and sync["mixed"] == 0
    # mixed steps and decode blocks alike were dispatched before their predecessor's tokens
    assert asyn["fed"] == [(False, True), (True, True)] and sync["fed"] == []
    assert asyn["tokens"] == sync["tokens"]
    assert asyn["text"] == sync["text"] and asyn["finish"] == sync["finish"]
    assert asyn["lp"] == sync["lp"]
    assert sync["finish"][5] == ["stop"] and len(sync["tokens"][3][0]) >= 6
    assert asyn["kv"] == 0.0 and sync["kv"] == 0.0  # every block freed, rows past a stop included
    assert runs["new_compiles"] == 0


def test_abort_while_a_mixed_step_is_ahead():
    llm = LLM(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=16,
              async_scheduling=True, cpu_kv_cache_gib=0.1, warmup=False)
    eng = llm.llm_engine
    for i, p in enumerate(PROMPTS[:4]):
        eng.add_request(str(i), p, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    done, steps = {}, 0
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                done[o.request_id] = o
        steps += 1
        if steps == 2:
            assert eng._inflight is not None  # a step scheduled ahead is on the device
            eng.abort_request("1")
    assert sorted(done) == ["0", "1", "2", "3"] and done["1"].outputs[0].finish_reason == "abort"
    assert all(len(done[k].outputs[0].token_ids) == 8 for k in "023")
    assert eng.scheduler.kv_usage() == 0.0
