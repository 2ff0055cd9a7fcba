"""jaxserve: a JAX/XLA LLM inference engine (paged KV cache, continuous batching, OpenAI server)."""
from jaxserve.outputs import CompletionOutput, Logprob, RequestOutput
from jaxserve.sampling_params import BeamSearchParams, SamplingParams

__version__ = "0.1.0"


def __getattr__(name):
    # LLM pulls in jax; import it lazily so `import jaxserve` stays cheap.
    if name == "LLM":
        from jaxserve.llm import LLM

        return LLM
    if name == "LLMEngine":
        from jaxserve.engine.llm_engine import LLMEngine

        return LLMEngine
    if name in ("AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs"):
        from jaxserve.engine import engine_args_api

        return getattr(engine_args_api, name)
    raise AttributeError(name)


__all__ = ["LLM", "LLMEngine", "AsyncLLMEngine", "EngineArgs", "AsyncEngineArgs", "SamplingParams",
           "BeamSearchParams", "RequestOutput", "CompletionOutput", "Logprob", "__version__"]
