"""The engine gives the same greedy tokens with the Pallas kernel (interpret mode on CPU) as with
the jnp reference attention."""
from jaxserve import LLM, SamplingParams


def test_pallas_backend_matches_reference():
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31], [40, 41, 42, 43]]
    sp = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = {}
    for backend in ("reference", "pallas"):
        llm = LLM("tiny", load_format="dummy", dtype="float32", max_model_len=64, max_num_seqs=4,
                  max_num_batched_tokens=16, attention_backend=backend, warmup=False,
                  num_gpu_blocks_override=64)
        outs[backend] = [o.outputs[0].token_ids for o in llm.generate(
            [{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)]
    assert outs["pallas"] == outs["reference"]
