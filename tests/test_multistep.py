"""Multi-step decoding (num_scheduler_steps): K decode steps per scheduler round trip with the
sampled tokens fed back on the device. Oracle: the same engine settings with single steps."""
import pytest

from jaxserve import LLM, SamplingParams

PROMPTS = ["The capital of France is", "Once upon a time", "def fibonacci(n):", "Water boils at",
           "The quick brown fox", "1, 2, 3,"]


def _params():
    out = []
    for i in range(len(PROMPTS)):
        # lengths that end inside a K=4 window, EOS allowed on some, seeded sampling on others
        out.append(SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, seed=100 + i, max_tokens=[3, 9, 14, 21, 6, 17][i],
                                  ignore_eos=i % 3 == 0))
    return out


@pytest.fixture(scope="module")
def results():
    res = {}
    for k in (1, 4):
        llm = LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                  num_scheduler_steps=k, cpu_kv_cache_gib=0.1)
        eng = llm.llm_engine
        compiles = eng.runner.num_compilations()
        outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
        # a request with a stop string falls back to single steps, mixed with multi-step ones
        mixed = llm.generate(PROMPTS[:2], [SamplingParams(temperature=0, max_tokens=12, stop=["\n"]),
                                           SamplingParams(temperature=0, max_tokens=12)], use_tqdm=False)
        res[k] = dict(tokens=[o.outputs[0].token_ids for o in outs], text=[o.outputs[0].text for o in outs],
                      finish=[o.outputs[0].finish_reason for o in outs], mixed=[o.outputs[0].text for o in mixed],
                      new_compiles=eng.runner.num_compilations() - compiles, kv=eng.scheduler.kv_usage(),
                      steps=eng.get_stats().num_steps)
    return res


def test_multistep_tokens_equal_single_step(results):
    assert results[4]["tokens"] == results[1]["tokens"]
    assert results[4]["text"] == results[1]["text"]
    assert results[4]["finish"] == results[1]["finish"]
    assert results[4]["mixed"] == results[1]["mixed"]
    assert [len(t) for t in results[4]["tokens"]][::3] == [3, 21]  # ignore_eos rows run to max_tokens


def test_multistep_takes_fewer_round_trips_and_never_compiles(results):
    assert results[4]["steps"] < results[1]["steps"]
    assert results[4]["new_compiles"] == 0 and results[1]["new_compiles"] == 0
    assert results[4]["kv"] == 0.0


def test_multistep_is_validated():
    from jaxserve.config import SchedulerConfig

    with pytest.raises(ValueError, match="num_scheduler_steps must be in"):
        SchedulerConfig(num_scheduler_steps=0)
