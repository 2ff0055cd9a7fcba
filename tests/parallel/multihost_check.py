"""One process of a multi-host run on CPU (started by test_parallel.py): argv = process_id,
num_processes, port, tp, pp, model, local device count. Prints the greedy tokens."""
import json
import os
import sys

pid, nproc, port, tp, pp, model, ndev = sys.argv[1:8]
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev}"
os.environ["JAX_PLATFORMS"] = "cpu"
from jaxserve import LLM, SamplingParams  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from prompts import PROMPTS, engine_kwargs  # noqa: E402

kw = engine_kwargs(model)
if int(nproc) > 1:
    kw.update(coordinator_address=f"127.0.0.1:{port}", num_processes=int(nproc), process_id=int(pid))
llm = LLM(tensor_parallel_size=int(tp), pipeline_parallel_size=int(pp), **kw)
sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
print("TOKENS " + json.dumps(toks), flush=True)
