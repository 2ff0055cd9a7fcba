"""Run by test_parallel.py in a fresh process with 6 fake CPU devices (the device count is fixed
when jax starts). Prints one line per layout with its greedy tokens and where its KV cache lives.

argv[1] names the half to run: "layouts" (the float32 layouts, then the refused sizes) or
"features" (float8 weights on one device and under TP=3 x PP=2, then speculation and swap under
TP=3 x PP=2). The test runs the two halves in two processes at once: each is mostly one thread of
XLA compilation, and CI has 2 cores."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=6"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))
from prompts import PROMPTS, engine_kwargs  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.core.sched_output import SchedulerOutput  # noqa: E402

sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def layouts():
    for tp, pp, dp in [(1, 1, 1), (3, 1, 1), (1, 2, 1), (1, 1, 2), (3, 2, 1)]:
        llm = LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp, data_parallel_size=dp, **engine_kwargs("default"))
        toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        eng = llm.llm_engine
        replicas = getattr(eng, "replicas", [eng])
        gate_up = replicas[0].runner.params["layers"][-1]["w_gate_up"]
        info = dict(
            tokens=toks,
            # per replica: the devices of the first and the last layer's KV cache, and its sharding spec
            kv=[[sorted(d.id for d in r.runner.kv_caches[i].devices()) for i in (0, -1)] for r in replicas],
            spec=str(replicas[0].runner.kv_caches[0].sharding.spec) if tp > 1 else None,
            # the last layer's w_gate_up [E, 2, F]: its partition spec (none on one device) and the
            # shapes of its shards
            gate_up=[list(getattr(gate_up.sharding, "spec", ())), sorted({x.data.shape for x in gate_up.addressable_shards})],
            prompt_tokens=[r.get_stats().prompt_tokens_total for r in replicas],
        )
        print(f"LAYOUT {tp} {pp} {dp} " + json.dumps(info), flush=True)
        del llm, eng, replicas, gate_up


def spec_and_swap():
    # speculative decoding and swap preemption's block transfers under TP=3 x PP=2, on one engine
    # with both (an engine build is ~15 s here; neither check depends on the other's setting, and
    # the swap check, which overwrites the KV cache, runs last)
    llm = LLM(tensor_parallel_size=3, pipeline_parallel_size=2, speculative_model="[ngram]", num_speculative_tokens=3,
              preemption_mode="swap", swap_space=0.05, **engine_kwargs("default"))
    eng = llm.llm_engine
    # speculation (a step split into micro-batches, the proposals checked on the last stage): the
    # tokens of the same engine without it
    rep = ["1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,", "a b c d a b c d a b c d a b", *PROMPTS[:2]]
    spec_sp = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    with_spec = [o.outputs[0].token_ids for o in llm.generate(rep, spec_sp, use_tqdm=False)]
    accepted = eng.get_stats().spec_num_accepted_tokens
    eng.scheduler.spec = None
    without = [o.outputs[0].token_ids for o in llm.generate(rep, spec_sp, use_tqdm=False)]
    print(f"SPEC {json.dumps(dict(same=with_spec == without, accepted=accepted))}", flush=True)
    # swap: blocks of every layer out to the host pool (each stage's layers gathered on its own
    # devices, pinned where the device has that memory) and back into other blocks, exact
    r = eng.runner
    nb = r.kv_caches[0].shape[1]
    r.kv_caches = [jax.device_put(np.random.default_rng(i).standard_normal(kv.shape).astype(kv.dtype), kv.sharding)
                   for i, kv in enumerate(r.kv_caches)]
    before = [np.asarray(kv) for kv in r.kv_caches]
    src, slots, dst = list(range(1, 71)), list(range(2, 72)), list(range(nb - 70, nb))
    r._apply_block_ops(SchedulerOutput(scheduled=[], total_num_tokens=0, swap_out=list(zip(src, slots))))
    r._apply_block_ops(SchedulerOutput(scheduled=[], total_num_tokens=0, swap_in=list(zip(slots, dst))))
    after = [np.asarray(kv) for kv in r.kv_caches]
    ok = all((a[:, dst] == b[:, src]).all() for a, b in zip(after, before))
    print(f"SWAP {json.dumps(dict(ok=bool(ok), layers=len(after), specs=sorted({str(kv.sharding.spec) for kv in r.kv_caches})))}",
          flush=True)
    del llm, eng, r


def bad_sizes():
    for bad in (dict(tensor_parallel_size=2), dict(pipeline_parallel_size=31),
                dict(tensor_parallel_size=3, data_parallel_size=3)):
        try:
            LLM(**bad, **engine_kwargs("default"))
            print("ERROR none", flush=True)
        except ValueError as e:
            print(f"ERROR {json.dumps(bad)} {e}", flush=True)


def fp8():
    # float8 weights: the sharded projections (per-channel scales of a row-parallel weight reduce
    # over its sharded input axis) must give the one-device float8 tokens
    for tp, pp in [(1, 1), (3, 2)]:
        llm = LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp, quantization="fp8", **engine_kwargs("default"))
        toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
        wo = llm.llm_engine.runner.params["layers"][0]["wo"]
        info = dict(tokens=toks, wo=[str(wo["q"].dtype), list(getattr(wo["q"].sharding, "spec", ()))],
                    wo_scales=[float(x) for x in wo["s"]][:64], wo_q=[float(x) for x in wo["q"][:4, :].ravel()])
        print(f"QLAYOUT {tp} {pp} " + json.dumps(info), flush=True)
        del llm, wo


PARTS = {"layouts": (layouts, bad_sizes), "features": (fp8, spec_and_swap)}
for part in PARTS[sys.argv[1]]:
    part()
