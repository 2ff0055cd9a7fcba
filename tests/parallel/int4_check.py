"""Run by test_parallel.py in a fresh process with 6 fake CPU devices: an AWQ checkpoint (argv[1])
on one device and with TP=3 x PP=2 (stage 0's layers split 3 ways as under TP=3 alone). Prints
one line per layout: its greedy tokens and how the first layer's row-parallel o projection (4-bit
words and group scales) is split.

argv[2] names the half to run (the test runs both at once, one per CI core): "one_device" (the
one-device layout, then the 4-bit kernel per shard against one device's product) or "split"
(TP=3 x PP=2)."""
import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=6"
os.environ["JAX_PLATFORMS"] = "cpu"
sys.path.insert(0, os.path.dirname(__file__))
from prompts import PROMPTS, engine_kwargs  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402

sp = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
HALF = sys.argv[2]
for tp, pp in {"one_device": [(1, 1)], "split": [(3, 2)]}[HALF]:
    kw = dict(engine_kwargs("default"), model=sys.argv[1])
    llm = LLM(tensor_parallel_size=tp, pipeline_parallel_size=pp, **kw)
    toks = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, sp, use_tqdm=False)]
    wo = llm.llm_engine.runner.params["layers"][0]["wo"]
    info = dict(tokens=toks, quantization=llm.llm_engine.model.quantization,
                wo={k: [list(getattr(v.sharding, "spec", ())), sorted({x.data.shape for x in v.addressable_shards})]
                    for k, v in wo.items()})
    print(f"INT4 {tp} {pp} " + json.dumps(info), flush=True)
    del llm, wo
if HALF != "one_device":
    sys.exit(0)
# the kernel and widen.py per shard (what a GPU runs under TP; interpret mode here): column and row
# splits of a 4-bit weight on a 3-device "model" axis against the product on one device
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402

from jaxserve.models import int4  # noqa: E402

mesh = Mesh(np.array(jax.devices()[:3]), ("model",))
rng = np.random.default_rng(0)
x = jnp.asarray(rng.standard_normal((5, 768)).astype(np.float32))
errs = {}
for split, shape, spec in (("col", (768, 2, 96), P(None, None, "model")), ("row", (768, 96), P("model", None))):
    qw = int4.quantize(jnp.asarray(rng.standard_normal(shape).astype(np.float32) * 0.05), group=128)
    want = np.asarray(int4.linear(x, qw, kernel=False))
    sharded = jax.tree_util.tree_map(lambda a: jax.device_put(a, NamedSharding(mesh, spec)), qw)
    got = jax.jit(lambda x, w, split=split: int4.linear(x, w, kernel=True, mesh=mesh, split=split))(x, sharded)
    errs[split] = [float(np.abs(np.asarray(got) - want).max() / np.abs(want).max()), list(got.shape)]
    # widen.py per shard (what a GPU runs under TP for steps above the kernel's rows)
    got = jax.jit(lambda x, w, split=split: int4.linear(x, w, kernel=False, widen=True, mesh=mesh, split=split))(
        x, sharded)
    errs[split + "_widen"] = [float(np.abs(np.asarray(got) - want).max() / np.abs(want).max()), list(got.shape)]
print("SHARDED " + json.dumps(errs), flush=True)
