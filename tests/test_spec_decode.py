"""Speculative decoding with n-gram lookup, end to end on the embedded model. Oracle: the same
engine with speculation switched off; seeded sampling makes the tokens comparable exactly
(a proposed token is accepted exactly when the model's own sample at that position equals it)."""
import pytest

from jaxserve import LLM, SamplingParams

PROMPTS = ["1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
           "The cat sat on the mat. The cat sat on the mat. The cat sat on the",
           "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n\ndef mul(a, b):\n",
           "Once upon a time",
           "Water boils at"]


def _params():
    return [SamplingParams(temperature=0.0, max_tokens=37, ignore_eos=True),  # ends inside a proposal
            SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=30),  # filtered sampling
            SamplingParams(temperature=0.0, max_tokens=40),
            SamplingParams(temperature=0.7, seed=5, max_tokens=20, presence_penalty=0.3),  # no proposals
            SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)]  # no proposals


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, cpu_kv_cache_gib=0.1,
               speculative_model="[ngram]", num_speculative_tokens=4)


@pytest.fixture(scope="module")
def results(llm):
    eng = llm.llm_engine
    compiles = eng.runner.num_compilations()
    res = {}
    for on in (False, True):
        eng.scheduler.spec = eng.config.speculative if on else None
        assert eng.reset_prefix_cache()
        s0 = eng.get_stats()
        outs = llm.generate(PROMPTS, _params(), use_tqdm=False)
        s1 = eng.get_stats()
        res[on] = dict(tokens=[o.outputs[0].token_ids for o in outs], text=[o.outputs[0].text for o in outs],
                       finish=[o.outputs[0].finish_reason for o in outs],
                       logprobs=[o.outputs[0].logprobs for o in outs][-1],
                       drafts=s1.spec_num_draft_tokens - s0.spec_num_draft_tokens,
                       accepted=s1.spec_num_accepted_tokens - s0.spec_num_accepted_tokens,
                       steps=s1.num_steps - s0.num_steps, kv=eng.scheduler.kv_usage())
    res["new_compiles"] = eng.runner.num_compilations() - compiles
    return res


def test_speculation_gives_the_tokens_of_decoding_without_it(results):
    off, on = results[False], results[True]
    assert on["tokens"] == off["tokens"]
    assert on["text"] == off["text"] and on["finish"] == off["finish"]
    assert len(on["tokens"][0]) == 37  # max_tokens exactly, though proposals ran in blocks of 4
    assert [[(lp[t].logprob, lp[t].rank) for t in lp] for lp in on["logprobs"]] == \
        [[(lp[t].logprob, lp[t].rank) for t in lp] for lp in off["logprobs"]]
    assert on["kv"] == 0.0 and off["kv"] == 0.0


def test_repeating_prompts_accept_proposals_and_nothing_compiles(results):
    assert results[False]["drafts"] == 0
    assert results[True]["accepted"] >= 20 and results[True]["drafts"] >= results[True]["accepted"]
    assert results["new_compiles"] == 0


def test_speculative_config_forms_and_errors():
    from jaxserve.config import engine_config_from_kwargs

    c = engine_config_from_kwargs(speculative_config={"method": "ngram", "num_speculative_tokens": 3,
                                                      "prompt_lookup_max": 5})
    assert (c.speculative.num_speculative_tokens, c.speculative.ngram_prompt_lookup_max) == (3, 5)
    with pytest.raises(ValueError, match="draft models are not supported"):
        engine_config_from_kwargs(speculative_model="facebook/opt-125m", num_speculative_tokens=5)
    with pytest.raises(ValueError, match="needs speculative_model"):
        engine_config_from_kwargs(num_speculative_tokens=5)
    with pytest.raises(ValueError, match="unknown keys"):
        engine_config_from_kwargs(speculative_config={"method": "ngram", "num_spec_tokens": 5})


def test_speculative_cli_flags():
    import argparse

    from jaxserve.config import engine_config_from_kwargs
    from jaxserve.engine_args import add_engine_args, engine_kwargs_from_args

    p = argparse.ArgumentParser()
    add_engine_args(p)
    a = p.parse_args(["--speculative-model", "[ngram]", "--num-speculative-tokens", "5"])
    assert engine_config_from_kwargs(**engine_kwargs_from_args(a)).speculative.num_speculative_tokens == 5
    a = p.parse_args(["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'])
    assert engine_config_from_kwargs(**engine_kwargs_from_args(a)).speculative.num_speculative_tokens == 2



def test_a_prediction_is_proposed_from_and_never_changes_the_output(llm):
    """SamplingParams.prediction (OpenAI's Predicted Outputs): the expected output is a source of
    proposals. Predicting the output itself gets nearly every token accepted; a wrong prediction
    costs acceptance, not correctness."""
    eng = llm.llm_engine
    prompt = "Once upon a time"
    eng.scheduler.spec = None
    want = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    eng.scheduler.spec = eng.config.speculative
    for pred, min_accepted in ((want.text, 30), (list(want.token_ids), 30), ("The quick brown fox jumps.", 0)):
        s0 = eng.get_stats()
        got = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, prediction=pred),
                           use_tqdm=False)[0].outputs[0]
        accepted = eng.get_stats().spec_num_accepted_tokens - s0.spec_num_accepted_tokens
        assert got.token_ids == want.token_ids and accepted >= min_accepted, (pred, accepted)
    with pytest.raises(ValueError, match="prediction"):
        SamplingParams(prediction=3.5)
    with pytest.raises(ValueError, match="prediction token ids must be in"):
        llm.llm_engine.add_request("bad-prediction", prompt, SamplingParams(prediction=[1, 10**9]))
