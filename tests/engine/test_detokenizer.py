"""Incremental detokenization equals a full decode; stop strings truncate as vLLM does."""
import numpy as np
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from jaxserve.engine.detokenizer import IncrementalDetokenizer

CORPUS = ["héllo wörld, the quick brown fox", "日本語のテキスト and emoji 🙂🙃", "stop here STOP now"] * 20


@pytest.fixture(scope="module")
def tok():
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=t)


def test_incremental_equals_full_decode(tok):
    rng = np.random.default_rng(0)
    for text in CORPUS[:3]:
        ids = tok.encode(text)
        d = IncrementalDetokenizer(tok, [])
        streamed = []
        i = 0
        while i < len(ids):
            k = int(rng.integers(1, 3))
            d.add_tokens(ids[i:i + k])
            streamed.append(d.visible_text(False))
            i += k
        d.add_tokens([], final=True)
        assert d.text == tok.decode(ids)
        assert all("\ufffd" not in s for s in streamed)
        assert all(streamed[j].startswith(streamed[j - 1]) for j in range(1, len(streamed)))


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_truncates(tok, include):
    ids = tok.encode("stop here STOP now")
    d = IncrementalDetokenizer(tok, [], stop=["STOP"], include_stop_str_in_output=include)
    hit = None
    for t in ids:
        hit = d.add_tokens([t])
        if hit:
            break
    assert hit == "STOP"
    assert d.text == ("stop here STOP" if include else "stop here ")


def test_holdback_hides_partial_stop_string(tok):
    d = IncrementalDetokenizer(tok, [], stop=["xyz123"])
    d.add_tokens(tok.encode("hello"))
    assert d.visible_text(False) == "hello"[: len("hello") - 5]
    assert d.visible_text(True) == "hello"
