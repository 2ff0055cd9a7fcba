"""vLLM's programmatic engine API over jaxserve's engines: EngineArgs / AsyncEngineArgs and
AsyncLLMEngine.from_engine_args(engine_args, start_engine_loop=True), so code written for

    engine = AsyncLLMEngine.from_engine_args(AsyncEngineArgs(model=..., max_num_seqs=256))
    async for out in engine.generate(prompt, sampling_params, request_id): ...

runs unchanged. The arguments are the flat engine keywords (`jaxserve generate --help`), checked
when the EngineArgs is made, not minutes later when the model loads.
"""
from __future__ import annotations

from typing import AsyncIterator, Optional

from jaxserve.config import engine_config_from_kwargs
from jaxserve.engine.async_engine import AsyncLLM
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams


class EngineArgs:
    """The engine keywords of LLM(...) as an object (vLLM's EngineArgs): EngineArgs(model=...,
    tensor_parallel_size=2). Unknown or invalid values raise here."""

    def __init__(self, **kwargs):
        engine_config_from_kwargs(**kwargs)  # validate now (TypeError / ValueError naming the fix)
        self.kwargs = dict(kwargs)

    def __getattr__(self, name):
        try:
            return self.__dict__["kwargs"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in self.kwargs.items())})"


class AsyncEngineArgs(EngineArgs):
    """EngineArgs for AsyncLLMEngine (the same keywords; vLLM keeps two classes)."""


def engine_kwargs(engine_args=None, **kwargs) -> dict:
    """An EngineArgs, or flat keywords, or both (keywords win) -> flat keywords."""
    if engine_args is not None and not isinstance(engine_args, EngineArgs):
        raise TypeError(f"expected an EngineArgs, got {type(engine_args).__name__}; or pass the engine "
                        f"keywords themselves (model=..., max_num_seqs=...)")
    return {**(engine_args.kwargs if engine_args is not None else {}), **kwargs}


class AsyncLLMEngine:
    """The engine loop in a background thread (jaxserve's AsyncLLM, which the server uses), with
    vLLM's AsyncLLMEngine calls: generate() is an async generator of RequestOutputs (text and
    tokens so far; the last has finished=True), abort(request_id)."""

    def __init__(self, engine_kwargs: dict, *, max_waiting_requests: Optional[int] = None):
        self._llm = AsyncLLM(engine_kwargs, max_waiting_requests=max_waiting_requests)

    @classmethod
    def from_engine_args(cls, engine_args: Optional[EngineArgs] = None, start_engine_loop: bool = True,
                         **kwargs) -> "AsyncLLMEngine":
        """Load the model and warm up (blocking, like vLLM's), then serve from the background
        thread. start_engine_loop is accepted for vLLM's signature: the loop always runs (it
        sleeps while there is no request). A model that cannot load raises here."""
        eng = cls(engine_kwargs(engine_args, **kwargs))
        eng._llm.wait_ready()
        return eng

    @property
    def engine(self):
        """The LLMEngine (or DataParallelEngine) the background thread steps."""
        return self._llm.engine

    async def generate(self, prompt, sampling_params: Optional[SamplingParams] = None, request_id: str = "",
                       *, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """prompt: a string, {"prompt": str} or {"prompt_token_ids": [...]}. Leaving the loop early
        (break, cancellation) aborts the request."""
        if not request_id:
            raise ValueError("generate() needs a request_id, unique among requests in flight")
        ids = None
        if isinstance(prompt, dict):
            ids = prompt.get("prompt_token_ids")
            prompt = prompt.get("prompt")
            if (prompt is None) == (ids is None):
                raise ValueError("a dict prompt needs exactly one of 'prompt' and 'prompt_token_ids'")
        async for out in self._llm.generate(prompt, sampling_params or SamplingParams(), request_id,
                                            prompt_token_ids=ids, priority=priority):
            yield out

    async def abort(self, request_id: str) -> None:
        self._llm.abort(request_id)

    def get_tokenizer(self):
        return self._llm.engine.tokenizer

    def get_stats(self):
        return self._llm.engine.get_stats()

    def shutdown(self) -> None:
        """Stop the background thread (requests in flight fail with EngineDeadError)."""
        self._llm.shutdown()
