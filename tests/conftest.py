"""Fixtures shared by several test modules."""
import pytest


@pytest.fixture(scope="session")
def smollm2_hf():
    """The embedded model (SmolLM2-135M-Instruct's GGUF file) in Hugging Face transformers, float32,
    eval mode: the torch oracle of several modules. Reading the GGUF file into transformers takes
    ~15 s, so it is loaded once per session; no test changes it (tests/models/test_int4.py's
    _write_quantized changes a deep copy)."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.test_generate_e2e import _gguf_path

    d, f = _gguf_path()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def smollm2_hf_tokenizer():
    """The transformers tokenizer of the same GGUF file (~4 s to read), once per session."""
    from transformers import AutoTokenizer

    from tests.test_generate_e2e import _gguf_path

    d, f = _gguf_path()
    return AutoTokenizer.from_pretrained(d, gguf_file=f)
