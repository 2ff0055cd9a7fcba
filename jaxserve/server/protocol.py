"""OpenAI request bodies as msgspec Structs (decoded and type-checked in one pass; they also
drive the generated OpenAPI schema). Values are range-checked when SamplingParams is built."""
from __future__ import annotations

from typing import Optional, Union

import msgspec


class StreamOptions(msgspec.Struct, kw_only=True):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _Sampling(msgspec.Struct, kw_only=True):
    model: Optional[str] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    n: int = 1
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    seed: Optional[int] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # vLLM's extras
    top_k: Optional[int] = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: Optional[list[int]] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    priority: int = 0
    # OpenAI's Predicted Outputs: {"type": "content", "content": str | [{"type": "text", "text": ...}]}
    prediction: Optional[dict] = None
    # Structured outputs and tools are not implemented: these fields are read so that a request
    # using them is refused (400, naming the field) instead of being answered as free text.
    response_format: Optional[dict] = None
    guided_json: Union[str, dict, None] = None
    guided_regex: Optional[str] = None
    guided_choice: Optional[list] = None
    guided_grammar: Optional[str] = None


class CompletionRequest(_Sampling, kw_only=True):
    # a string, a list of strings, a list of token ids, or a list of token-id lists
    prompt: Union[str, list[Union[str, int, list[int]]]]
    max_tokens: Optional[int] = 16
    logprobs: Optional[int] = None
    echo: bool = False
    suffix: Optional[str] = None
    best_of: Optional[int] = None


class TextPart(msgspec.Struct, kw_only=True):
    type: str
    text: Optional[str] = None


class ChatMessage(msgspec.Struct, kw_only=True):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ChatCompletionRequest(_Sampling, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: Optional[int] = None
    max_completion_tokens: Optional[int] = None
    logprobs: bool = False
    top_logprobs: Optional[int] = None
    chat_template: Optional[str] = None
    add_generation_prompt: bool = True
    tools: Optional[list] = None
    tool_choice: Union[str, dict, None] = None
    functions: Optional[list] = None
    function_call: Union[str, dict, None] = None


class TokenizeRequest(msgspec.Struct, kw_only=True):
    model: Optional[str] = None
    prompt: Optional[str] = None
    messages: Optional[list[ChatMessage]] = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True


class DetokenizeRequest(msgspec.Struct, kw_only=True):
    tokens: list[int]
    model: Optional[str] = None
