"""Beam search checked against greedy decoding and the model's own log-probabilities."""
import pytest

from jaxserve import BeamSearchParams, LLM, SamplingParams


@pytest.fixture(scope="module")
def llm():
    return LLM(dtype="float32", max_model_len=256, max_num_seqs=16, max_num_batched_tokens=64, warmup=False)


def _logprob_of(llm, prompt, cont):
    """Sum of log p(cont[i] | prompt + cont[:i]) from prompt logprobs of the whole sequence."""
    full = prompt + cont
    out = llm.generate({"prompt_token_ids": full}, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    return sum(out.prompt_logprobs[len(prompt) + i][t].logprob for i, t in enumerate(cont))


def test_width_one_is_greedy(llm):
    ids = llm.get_tokenizer().encode("The capital of France is")
    beam = llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=1, max_tokens=6, ignore_eos=True))
    greedy = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
                          use_tqdm=False)[0]
    assert beam[0].sequences[0].token_ids == greedy.outputs[0].token_ids


def test_beams_are_scored_and_ranked_correctly(llm):
    ids = llm.get_tokenizer().encode("Once upon a time")
    res = llm.beam_search([{"prompt_token_ids": ids}], BeamSearchParams(beam_width=3, max_tokens=3, ignore_eos=True,
                                                                      length_penalty=0.0))[0]
    seqs = res.sequences
    assert len(seqs) == 3 and len({tuple(s.token_ids) for s in seqs}) == 3
    scores = [s.cumulative_logprob for s in seqs]
    assert scores == sorted(scores, reverse=True)
    for s in seqs:  # the reported score is the model's own log-probability of the continuation
        assert abs(_logprob_of(llm, ids, s.token_ids) - s.cumulative_logprob) < 1e-3
    # The best beam is at least as likely as the greedy continuation.
    greedy = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0].token_ids
    assert scores[0] >= _logprob_of(llm, ids, greedy) - 1e-4
    assert llm.llm_engine.scheduler.kv_usage() == 0.0
