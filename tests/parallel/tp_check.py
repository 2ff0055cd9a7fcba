"""Run by test_tensor_parallel.py in a fresh process with 4 fake CPU devices."""
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
from jaxserve import LLM, SamplingParams
prompts = ["The capital of France is", "Once upon a time", "def add(a, b):"]
sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
res = {}
for tp in (1, 3):
    llm = LLM(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, warmup=False,
              tensor_parallel_size=tp, cpu_kv_cache_gib=0.1)
    res[tp] = [o.outputs[0].token_ids for o in llm.generate(prompts, sp, use_tqdm=False)]
    print(tp, res[tp][0], llm.llm_engine.runner.kv_caches[0].sharding)
print("EQUAL", res[1] == res[3])
try:
    LLM(max_model_len=256, warmup=False, tensor_parallel_size=2)
except ValueError as e:
    print("TP2:", e)
