"""Run by test_parallel.py in a fresh process with 6 fake CPU devices: an AWQ checkpoint (argv[1])
on one device, with TP=3 and with TP=3 x PP=2. Prints one line per layout: its greedy tokens and
how the first layer's row-parallel o projection (4-bit words and group scales) is split."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=6"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))
from prompts import PROMPTS, engine_kwargs  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402

sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
for tp, pp in [(1, 1), (3, 1), (3, 2)]:
    kw = dict(engine_kwargs("default"), model=sys.argv[1])
    llm = LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    wo = llm.llm_engine.runner.params["layers"][0]["wo"]
    info = dict(tokens=toks, quantization=llm.llm_engine.model.quantization,
                wo={k: [list(getattr(v.sharding, "spec", ())), sorted({x.data.shape for x in v.addressable_shards})]
                    for k, v in wo.items()})
    print(f"INT4 {tp} {pp} " + json.dumps(info), flush=True)
    del llm, wo
