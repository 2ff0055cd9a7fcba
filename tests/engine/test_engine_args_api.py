"""vLLM's programmatic API: EngineArgs / AsyncEngineArgs, AsyncLLMEngine.from_engine_args and its
async generate(), and vLLM's attention backend names."""
import asyncio
import time

import pytest

from jaxserve import AsyncEngineArgs, AsyncLLMEngine, EngineArgs, SamplingParams


def test_engine_args_are_checked_when_made():
    with pytest.raises(TypeError, match="unknown engine argument 'max_num_seq'"):
        EngineArgs(max_num_seq=8)
    with pytest.raises(ValueError, match="max_num_seqs must be >= 1"):
        AsyncEngineArgs(max_num_seqs=0)
    a = AsyncEngineArgs(max_num_seqs=8, tensor_parallel_size=1)
    assert a.max_num_seqs == 8 and "max_num_seqs=8" in repr(a)


@pytest.mark.parametrize("name,want", [("flash_attn", "auto"), ("FLASH_ATTN", "auto"), ("torch_sdpa", "reference"),
                                       ("pallas", "pallas")])
def test_vllm_attention_backend_names(name, want):
    from jaxserve.config import engine_config_from_kwargs

    assert engine_config_from_kwargs(attention_backend=name).attention_backend == want
    with pytest.raises(ValueError, match="vLLM's names"):
        engine_config_from_kwargs(attention_backend="cuda_magic")


@pytest.fixture(scope="module")
def engine():
    eng = AsyncLLMEngine.from_engine_args(
        AsyncEngineArgs(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64,
                        cpu_kv_cache_gib=0.1, warmup=False), start_engine_loop=True)
    yield eng
    eng.shutdown()


def test_async_generate_streams_and_dict_prompts_agree(engine):
    sp = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ids = engine.get_tokenizer().encode("The capital of France is", add_special_tokens=True)

    async def run(prompt, rid):
        return [o async for o in engine.generate(prompt, sp, rid)]

    async def both():
        return await asyncio.gather(run("The capital of France is", "s"), run({"prompt_token_ids": ids}, "t"))

    by_text, by_ids = asyncio.run(both())
    assert by_text[-1].finished and not any(o.finished for o in by_text[:-1])
    assert len(by_text[-1].outputs[0].token_ids) == 12
    assert by_text[-1].outputs[0].token_ids == by_ids[-1].outputs[0].token_ids
    assert by_text[-1].prompt_token_ids == ids
    # cumulative outputs: every streamed output's tokens start the final ones
    final = by_text[-1].outputs[0].token_ids
    assert all(final[:len(o.outputs[0].token_ids)] == o.outputs[0].token_ids for o in by_text)


def test_leaving_the_loop_aborts_the_request(engine):
    async def first_only():
        async for _ in engine.generate("Once upon a time", SamplingParams(max_tokens=200, ignore_eos=True), "x"):
            break

    asyncio.run(first_only())
    deadline = time.time() + 30
    while engine.engine.has_unfinished_requests() and time.time() < deadline:
        time.sleep(0.05)
    assert not engine.engine.has_unfinished_requests()
    with pytest.raises(ValueError, match="request_id"):
        asyncio.run(anext(engine.generate("hi", SamplingParams(), "")))
