"""Request sets from a ShareGPT-format file (`--dataset sharegpt --dataset-path`): the first turn's
tokens are the prompt, the reply's token count the output length, vLLM's length filter applies,
and bad files or settings get clear errors before any engine starts. Oracle: the tokenizer run on
the file's texts here, and the engine's own token counts end to end."""
import json

import pytest

from jaxserve.bench.datasets import check_dataset, make_requests, sharegpt_requests
from jaxserve.cli import main
from jaxserve.tokenizer import DummyTokenizer

TOK = DummyTokenizer(1000)  # what `--load-format dummy` models tokenize with (bytes)
GOOD = [("Tell me about the river town.", "It sits by the water and its people fish."),
        ("def add(a, b):", "    return a + b  # the sum"),
        ("What is the capital of France?", "Paris, on the Seine.")]
DATA = ([{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]} for p, r in GOOD[:2]]
        + [{"messages": [{"role": "user", "content": GOOD[2][0]}, {"role": "assistant", "content": GOOD[2][1]}]},
           {"conversations": [{"from": "human", "value": "only one turn"}]},
           {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "a long enough reply"}]},
           {"conversations": [{"from": "human", "value": "x" * 300}, {"from": "gpt", "value": "too long together"}]},
           "not a conversation", {"id": "no turns"}])


@pytest.fixture()
def sharegpt(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps(DATA))
    return str(path)


def _expected():
    return sorted((TOK.encode(p), len(TOK.encode(r, add_special_tokens=False))) for p, r in GOOD)


def test_prompts_and_output_lengths_come_from_the_conversations(sharegpt):
    reqs = sharegpt_requests(sharegpt, 10, TOK, max_model_len=200, seed=3)
    # the one-turn entry, the 2-token prompt, the 300-token pair and the junk entries are skipped
    assert sorted((r.prompt_token_ids, r.output_len) for r in reqs) == _expected()
    again = sharegpt_requests(sharegpt, 10, TOK, max_model_len=200, seed=3)
    assert [r.prompt_token_ids for r in again] == [r.prompt_token_ids for r in reqs]  # seeded order
    two = sharegpt_requests(sharegpt, 2, TOK, max_model_len=200, seed=3)
    assert [r.prompt_token_ids for r in two] == [r.prompt_token_ids for r in reqs[:2]]
    fixed = sharegpt_requests(sharegpt, 10, TOK, max_model_len=200, seed=3, output_len=7)
    assert {r.output_len for r in fixed} == {7}


@pytest.mark.parametrize("content, words", [("{not json", "is not JSON"), ('{"a": 1}', "expected a JSON list"),
                                            ('[{"conversations": []}]', "no conversation with two text turns")])
def test_bad_files_are_explained(tmp_path, content, words):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=words):
        sharegpt_requests(str(path), 4, TOK, max_model_len=200)


def test_nothing_that_fits_is_explained(sharegpt):
    with pytest.raises(ValueError, match="none of its 5 conversations fits"):
        sharegpt_requests(sharegpt, 4, TOK, max_model_len=20)


def test_settings_are_checked_first(tmp_path, sharegpt):
    with pytest.raises(ValueError, match="needs --dataset-path"):
        check_dataset("sharegpt", None)
    with pytest.raises(ValueError, match="no such file"):
        check_dataset("sharegpt", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="read by --dataset sharegpt"):
        check_dataset("random", sharegpt)
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        make_requests("sharegpt", 4, 16, 16, 1000, 200, dataset_path=sharegpt)


def test_bench_throughput_runs_the_file_on_the_engine(sharegpt, capsys):
    assert main(["bench", "throughput", "--dataset-name", "sharegpt", "--dataset-path", sharegpt, "--num-prompts", "5",
                 "--model", "tiny", "--load-format", "dummy", "--max-model-len", "128", "--max-num-seqs", "8",
                 "--max-num-batched-tokens", "64", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    exp = _expected()  # three fit under max_model_len=128; the engine generates exactly their lengths
    assert res["num_prompts"] == 3 and res["output_tokens"] == sum(n for _, n in exp)
    assert res["prompt_tokens"] == sum(len(p) for p, _ in exp)
    # a missing file is refused before the engine starts
    assert main(["bench", "throughput", "--dataset", "sharegpt", "--dataset-path", sharegpt + ".nope",
                 "--model", "tiny", "--load-format", "dummy"]) == 2
    assert "no such file" in capsys.readouterr().err
