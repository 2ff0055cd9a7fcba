"""Tokenizers and chat templates.

A GGUF file's tokenizer is rebuilt by transformers from the file's metadata (slow: ~10 s for
SmolLM2), so the result is cached under ~/.cache/jaxserve/tokenizers keyed by the file's path,
size and mtime.
"""
from __future__ import annotations

import hashlib
import logging
import os
from typing import Optional

logger = logging.getLogger("jaxserve")


def _cache_dir(path: str) -> str:
    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    base = os.environ.get("JAXSERVE_CACHE", os.path.expanduser("~/.cache/jaxserve"))
    return os.path.join(base, "tokenizers", key)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    if path.endswith(".gguf") and os.path.isfile(path):
        cache = _cache_dir(path)
        if os.path.isfile(os.path.join(cache, "tokenizer_config.json")):
            try:
                return AutoTokenizer.from_pretrained(cache)
            except Exception:  # a stale or partial cache: rebuild
                pass
        tok = AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
        try:
            os.makedirs(cache, exist_ok=True)
            tok.save_pretrained(cache)
        except OSError as e:
            logger.warning("could not cache the tokenizer in %s: %s", cache, e)
        return tok
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise ValueError(f"could not load a tokenizer from {path}: {e}") from e


def _read_template(t: Optional[str]) -> Optional[str]:
    if t and os.path.isfile(t):
        with open(t) as f:
            return f.read()
    return t


def apply_chat_template(tokenizer, messages: list[dict], template: Optional[str],
                        add_generation_prompt: bool = True) -> list[int]:
    template = _read_template(template)
    if template is None and getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("this model has no chat template; pass one with --chat-template (a Jinja string "
                         "or a file) or use the completions API")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"each message needs a 'role' and 'content', got {m!r}")
    ids = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=True,
                                        add_generation_prompt=add_generation_prompt)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


class DummyTokenizer:
    """For dummy weights: token i <-> a short printable piece, so the engine's text path runs."""

    chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                     "{% if add_generation_prompt %}<|assistant|>{% endif %}")

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.eos_token_id = vocab_size - 1
        self.bos_token_id = None
        self.eos_token = "</s>"

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [b % (self.vocab_size - 1) for b in text.encode()]

    def decode(self, ids, skip_special_tokens: bool = True, **_) -> str:
        return "".join(chr(0x4E00 + (i % 20000)) for i in ids if not (skip_special_tokens and i == self.eos_token_id))

    def apply_chat_template(self, messages, chat_template=None, tokenize=True, add_generation_prompt=True, **_):
        import jinja2

        text = jinja2.Template(chat_template or self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text) if tokenize else text

    def convert_ids_to_tokens(self, ids):
        return [self.decode([i]) for i in ids]
