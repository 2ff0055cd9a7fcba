"""LLMEngine: add_request / abort_request / step — the loop schedule -> run -> update -> detokenize.

Synchronous and single-threaded by design; the async front end (async_engine.py) drives it from
one background thread.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Optional, Union

import numpy as np

from jaxserve.config import EngineConfig, engine_config_from_kwargs
from jaxserve.core.request import Request
from jaxserve.core.scheduler import Scheduler
from jaxserve.engine.detokenizer import IncrementalDetokenizer, decode_token
from jaxserve.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger("jaxserve")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    num_swapped: int
    kv_cache_usage: float  # 0..1 of usable blocks
    prompt_tokens_total: int
    generation_tokens_total: int
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache
    prefix_cache_hits: int  # of which found
    num_preemptions_total: int
    num_compilations: int  # jit cache entries; constant after warm-up
    num_steps: int
    num_async_steps: int = 0  # steps dispatched before the previous step's tokens were back
    # Speculative decoding: sequence-steps that carried proposed tokens, the tokens proposed,
    # and of those the tokens accepted (each such step also emits one token of the model's own).
    spec_num_drafts: int = 0
    spec_num_draft_tokens: int = 0
    spec_num_accepted_tokens: int = 0


@dataclass
class _Seq:
    index: int
    detok: IncrementalDetokenizer
    num_logprobs: int  # top-k alternatives per token (SamplingParams.logprobs or 0)
    token_ids: list = field(default_factory=list)
    logprobs: Optional[list] = None
    cumulative_logprob: float = 0.0
    finish_reason: Optional[str] = None
    stop_reason: object = None


@dataclass
class _ReqState:
    request_id: str
    prompt: Optional[str]
    prompt_token_ids: list
    params: SamplingParams
    seqs: list
    metrics: RequestMetrics
    prompt_logprobs: Optional[list] = None
    num_cached_tokens: int = 0
    finished: bool = False
    stream: bool = True  # report every step's progress (else only the finished request)


def _allocator_limit(device) -> Optional[int]:
    """The bytes the device's allocator may hand out (None on the CPU: host memory, not checked)."""
    return None if device.platform == "cpu" else (device.memory_stats() or {}).get("bytes_limit")


class LLMEngine:
    def __init__(self, config: EngineConfig, devices=None):
        """devices: the devices of this replica (default: the first tp x pp visible ones);
        data-parallel front ends give each replica its own."""
        from jaxserve.runner import kv_cache as kvc

        kvc.configure_xla_memory(config.cache.gpu_memory_utilization)
        pc = config.parallel
        if pc.num_processes > 1:
            from jaxserve.parallel import distributed

            distributed.initialize(pc.coordinator_address, pc.num_processes, pc.process_id)
        import jax
        import jax.numpy as jnp

        from jaxserve.models import int4, registry
        from jaxserve.models.loader import load_model
        from jaxserve.runner.model_runner import ModelRunner
        from jaxserve.runner.sampler import SPEC_VERIFY_ROWS

        cache_dir = config.compilation_cache_dir
        if cache_dir is None and jax.devices()[0].platform != "cpu":
            cache_dir = os.path.join(os.path.expanduser("~"), ".cache", "jaxserve", "xla")
        self.compilation_cache_dir = cache_dir or None
        if self.compilation_cache_dir:
            jax.config.update("jax_compilation_cache_dir", self.compilation_cache_dir)
        self.config = config
        mc = config.model
        platform = jax.devices()[0].platform
        dtype_name = mc.dtype if mc.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
        self.dtype = jnp.dtype(dtype_name)
        self.plan = None
        load_kw = {}
        if pc.tensor_parallel_size > 1 or pc.pipeline_parallel_size > 1 or devices is not None or pc.num_processes > 1:
            from jaxserve.parallel.plan import ParallelPlan

            if pc.num_processes > 1 and pc.pipeline_parallel_size > 1:
                raise ValueError("pipeline_parallel_size > 1 across several processes is not supported; "
                                 "split the model with tensor_parallel_size across hosts instead")
            if pc.num_processes > 1 and pc.tensor_parallel_size * pc.pipeline_parallel_size != jax.device_count():
                raise ValueError(
                    f"with {pc.num_processes} processes the mesh must use all {jax.device_count()} devices: "
                    f"tensor_parallel_size x pipeline_parallel_size is {pc.tensor_parallel_size} x "
                    f"{pc.pipeline_parallel_size}")
            self.plan = ParallelPlan.create(pc.tensor_parallel_size, pc.pipeline_parallel_size, devices)
            load_kw = dict(arch_fn=self.plan.arch_fn, transform_fn=self.plan.transform_fn,
                           shardings_fn=lambda arch: self.plan.param_shardings(registry.model_module(arch), arch))
        t0 = time.perf_counter()
        # quantization: "fp8" makes each layer projection float8 as it is placed (models/quant.py);
        # "awq" / "gptq" (or a checkpoint of either format) load 4-bit weights (models/int4.py)
        self.model = load_model(mc, self.dtype, quantization=mc.quantization,
                                before_load=functools.partial(self._check_weights_fit, devices), **load_kw)
        module = registry.model_module(self.model.arch)
        if hasattr(module, "fuse_qkv"):  # one attention-projection GEMM per layer (models/llama.py)
            fused = module.fuse_qkv(self.model.params, self.model.arch, free=True)
            self.model = dataclasses.replace(self.model, params=fused)
        if int4.rows_enabled(sharded=self.plan is not None):  # one Hopper GPU: the Mosaic-GPU kernel's layout
            self.model = dataclasses.replace(self.model, params=int4.with_rows(self.model.params, free=True))
        arch = self.model.arch
        limit = arch.context_limit
        if mc.max_model_len is not None and mc.max_model_len > limit:
            raise ValueError(
                f"max_model_len={mc.max_model_len} is larger than the model supports ({limit} positions: "
                f"max_position_embeddings={arch.max_position_embeddings}, rope_scaling={arch.rope_scaling_dict}); "
                f"pass max_model_len <= {limit}, or extend the context with rope_scaling, e.g. "
                f"rope_scaling={{'rope_type': 'dynamic', 'factor': {-(-mc.max_model_len // arch.max_position_embeddings)}}}")
        self.max_model_len = mc.max_model_len or limit
        sc = config.scheduler
        if not sc.enable_chunked_prefill and sc.max_num_batched_tokens < self.max_model_len:
            raise ValueError(
                f"with chunked prefill off, max_num_batched_tokens ({sc.max_num_batched_tokens}) must be "
                f">= max_model_len ({self.max_model_len}); raise it, lower max_model_len, or enable "
                f"chunked prefill")
        self.tokenizer = self.model.tokenizer
        self.model_name = mc.served_model_name or self.model.name
        self.eos_token_ids = frozenset(self.model.eos_token_ids)
        logger.info("loaded %s (%s%s, %d layers) in %.1f s", self.model_name, dtype_name,
                    f", {self.model.quantization} weights" if self.model.quantization else "", arch.num_layers,
                    time.perf_counter() - t0)
        self.runner = ModelRunner(config, self.model, max_model_len=self.max_model_len, dtype=self.dtype,
                                  plan=self.plan)
        if config.warmup:  # (may shrink the KV cache: a step that does not fit beside it)
            self.runner.warmup(parallel=bool(self.compilation_cache_dir))
        self.scheduler = Scheduler(sc, config.cache, num_device_blocks=self.runner.num_blocks,
                                   num_host_blocks=self.runner.num_host_blocks,
                                   block_size=config.cache.block_size, max_model_len=self.max_model_len,
                                   speculative=config.speculative, max_spec_rows=SPEC_VERIFY_ROWS[-1])
        if config.speculative.enabled:
            sp = config.speculative
            logger.info("speculative decoding: n-gram lookup (%d..%d tokens), up to %d proposed tokens per step, "
                        "while at most %d sequences run (speculative_disable_by_batch_size)",
                        sp.ngram_prompt_lookup_min, sp.ngram_prompt_lookup_max, sp.num_speculative_tokens,
                        self.scheduler.spec_batch_limit)
        self._rng = np.random.default_rng(mc.seed)
        self._requests: dict[str, _ReqState] = {}
        self._seq_owner: dict[str, tuple[str, int]] = {}
        self._pending: list[RequestOutput] = []  # outputs produced outside step() (aborts)
        self._prompt_tokens_total = 0
        self._generation_tokens_total = 0
        self._num_steps = 0
        self._inflight = None  # (SchedulerOutput, PendingStep): the next step, already dispatched
        self.trace: Optional[list] = None  # set to [] to record per-step scheduler stats
        self._preemptions_warned = 0  # the preemption count at the last warning
        self._preemption_warned_at = None  # time.monotonic() of that warning

    def _check_weights_fit(self, devices, arch, quantization=None) -> None:
        """Before loading: refuse a model whose weights cannot fit on its devices (ModelTooLargeError
        naming float8 weights or more devices), instead of running out of memory while loading."""
        import jax

        from jaxserve.models import footprint, registry

        pc = self.config.parallel
        device = (devices or jax.local_devices())[0]
        limit = _allocator_limit(device)
        shapes = registry.model_module(arch).param_shapes(arch)
        footprint.check_weights_fit(
            footprint.weight_bytes(shapes, self.dtype, quantization),
            devices=pc.tensor_parallel_size * pc.pipeline_parallel_size, device_limit=limit,
            where=device.device_kind, utilization=self.config.cache.gpu_memory_utilization,
            quantization=quantization, fp8_total=footprint.weight_bytes(shapes, self.dtype, "fp8"))

    @classmethod
    def from_engine_args(cls, engine_args=None, **kwargs) -> "LLMEngine":
        """An EngineArgs (vLLM's call), flat engine keywords, or both (keywords win)."""
        from jaxserve.engine.engine_args_api import engine_kwargs

        return cls(engine_config_from_kwargs(**engine_kwargs(engine_args, **kwargs)))

    # ---- requests ---------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = True,
                            chat_template: Optional[str] = None) -> list[int]:
        from jaxserve.tokenizer import apply_chat_template

        template = chat_template or self.config.model.chat_template or self.model.chat_template
        return apply_chat_template(self.tokenizer, messages, template,
                                   add_generation_prompt=add_generation_prompt)

    def _validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        n = len(prompt_ids)
        if n == 0:
            raise ValueError("the prompt is empty; give at least one token")
        if n >= self.max_model_len:
            raise ValueError(
                f"the prompt has {n} tokens but max_model_len is {self.max_model_len}: at most "
                f"{self.max_model_len - 1} prompt tokens leave room for one generated token")
        vocab = self.model.arch.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"prompt token ids must be in [0, {vocab}); got {bad[:5]}")
        for k in (params.logprobs, params.prompt_logprobs):
            if k is not None and k > self.config.max_logprobs:
                raise ValueError(f"logprobs={k} exceeds the engine's max_logprobs={self.config.max_logprobs}")
        if params.logit_bias and any(not 0 <= t < vocab for t in params.logit_bias):
            raise ValueError(f"logit_bias token ids must be in [0, {vocab})")
        if isinstance(params.prediction, (list, tuple)) and any(not 0 <= t < vocab for t in params.prediction):
            raise ValueError(f"prediction token ids must be in [0, {vocab})")
        from jaxserve.runner.sampling_inputs import MAX_BIAS_ENTRIES

        n_bias = len(set(params.logit_bias or {}) | set(params.stop_token_ids) | set(self.eos_token_ids))
        if n_bias > MAX_BIAS_ENTRIES:
            raise ValueError(f"at most {MAX_BIAS_ENTRIES} logit_bias entries plus stop token ids, got {n_bias}")

    def add_request(self, request_id: str, prompt: Union[str, list[int], None], params: SamplingParams, *,
                    prompt_token_ids: Optional[list[int]] = None, priority: int = 0,
                    arrival_time: Optional[float] = None, stream: bool = True) -> list[int]:
        """Queue a request; returns its prompt token ids. stream=False: step() reports the request
        only when it finishes (offline generation), which saves host work on every step."""
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if isinstance(prompt, (list, tuple)):
            prompt_token_ids, prompt = list(prompt), None
        if prompt_token_ids is None:
            if prompt is None:
                raise ValueError("give a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        self._validate(prompt_token_ids, params)
        if params.max_tokens is None:
            params = params.clone(max_tokens=self.max_model_len - len(prompt_token_ids))
        seed = params.seed if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        arrival = arrival_time if arrival_time is not None else time.time()
        prio = priority if priority else params.priority
        pred = params.prediction if self.config.speculative.enabled else None  # (only proposals use it)
        if isinstance(pred, str):
            pred = self.tokenizer.encode(pred, add_special_tokens=False)
        req = Request(request_id, prompt_token_ids, params, self.eos_token_ids, arrival, seed, prio,
                      # (no more of it than the output can use)
                      prediction_token_ids=list(pred[:params.max_tokens]) if pred else None)
        self.scheduler.add_request(req)  # raises ValueError when it can never be served
        seqs = []
        for i in range(params.n):
            det = IncrementalDetokenizer(
                self.tokenizer, prompt_token_ids, skip_special_tokens=params.skip_special_tokens,
                spaces_between_special_tokens=params.spaces_between_special_tokens, stop=params.stop,
                include_stop_str_in_output=params.include_stop_str_in_output, lazy=not stream)
            seqs.append(_Seq(i, det, params.logprobs or 0, logprobs=[] if params.logprobs is not None else None))
            self._seq_owner[request_id if params.n == 1 else f"{request_id}-{i}"] = (request_id, i)
        st = _ReqState(request_id, prompt, prompt_token_ids, params, seqs, RequestMetrics(arrival_time=arrival),
                       stream=stream)
        if params.prompt_logprobs is not None:
            st.prompt_logprobs = [None] * len(prompt_token_ids)
        self._requests[request_id] = st
        self._prompt_tokens_total += len(prompt_token_ids)
        return prompt_token_ids

    def abort_request(self, request_ids: Union[str, list[str]]) -> None:
        if isinstance(request_ids, str):
            request_ids = [request_ids]
        for rid in request_ids:
            st = self._requests.get(rid)
            if st is None:
                continue
            self.scheduler.abort_request(rid)
            for s in st.seqs:
                if s.finish_reason is None:
                    s.finish_reason = "abort"
            st.finished = True
            st.metrics.finished_time = time.time()
            self._pending.append(self._make_output(st))
            self._forget(st)
        self._drop_idle_block()

    def _forget(self, st: _ReqState) -> None:
        self._requests.pop(st.request_id, None)
        for i in range(len(st.seqs)):
            self._seq_owner.pop(st.request_id if len(st.seqs) == 1 else f"{st.request_id}-{i}", None)

    def num_unfinished_requests(self) -> int:
        return len(self._requests)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._pending)

    def reset_prefix_cache(self) -> bool:
        """Forget the prefix cache; False (nothing changed) while requests hold KV blocks."""
        return self.scheduler.reset_prefix_cache()

    # ---- the loop ---------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One step's results. Under async scheduling the step may already be on the device
        (dispatched by the previous call): then this call takes its results, after scheduling
        the step that follows it when the scheduler can tell what that is without them, and
        dispatching it at once: its rows that continue a sequence take this step's samples on
        the device (decode blocks, and prefill / mixed steps the runner can run without waiting,
        `async_step`); a step that needs logprobs is dispatched once this step's tokens are back)."""
        outputs, self._pending = self._pending, []
        if self._inflight is not None:
            so, pending = self._inflight
            self._inflight = None
        else:
            so = self.scheduler.schedule()
            self._fill_prompt_ids(so)
            if so.is_empty and not (so.swap_in or so.swap_out or so.copy_blocks):
                return outputs
            pending = self.runner.dispatch(so)
        if so.decode_block:
            nxt = self.scheduler.schedule_next_block(so)
            if nxt is not None:
                self._inflight = (nxt, self.runner.dispatch(nxt, pending))
            ro = self.runner.collect(pending)
        else:
            # A prefill / mixed step on the device: schedule the next step meanwhile and, when it
            # can run without its tokens on the host, dispatch it behind this one (its continuing
            # rows fed from this step's samples on the device).
            nxt = self.scheduler.schedule_next_step(so) if pending.out is None else None
            ahead = nxt is not None and (nxt.decode_block or self.runner.async_step(nxt))
            if ahead:
                self._fill_prompt_ids(nxt)
                self._inflight = (nxt, self.runner.dispatch(nxt, pending))
            ro = self.runner.collect(pending)
            if nxt is not None:
                _write_pending_tokens(nxt, ro)  # the host's record of the rows fed on the device
                if not ahead:
                    self._fill_prompt_ids(nxt)
                    self._inflight = (nxt, self.runner.dispatch(nxt))
        self._num_steps += 1
        now = time.time()
        for sr in so.scheduled:
            owner = self._owner(sr.req_id)
            if owner is not None and self._requests[owner[0]].metrics.first_scheduled_time is None:
                self._requests[owner[0]].metrics.first_scheduled_time = now
        rows = {rid: i for i, rid in enumerate(ro.req_ids)}
        self._take_prompt_logprobs(ro)
        changed: dict[str, _ReqState] = {}
        updates = collections.deque(self.scheduler.update_from_output(so, ro))
        while updates:
            u = updates.popleft()
            st = self._requests.get(u.request_id)
            if st is None:
                continue
            seq = st.seqs[u.index]
            st.num_cached_tokens = max(st.num_cached_tokens, u.num_cached_tokens)
            changed[st.request_id] = st
            if u.new_token_ids:
                if st.metrics.first_token_time is None:
                    st.metrics.first_token_time = now
                st.metrics.last_token_time = now
                self._generation_tokens_total += len(u.new_token_ids)
                seq.token_ids.extend(u.new_token_ids)
                self._append_logprobs(seq, ro, rows.get(u.seq_id))
                stop = seq.detok.add_tokens(u.new_token_ids, final=u.finish_reason is not None)
                if stop is not None and u.finish_reason is None:
                    seq.finish_reason, seq.stop_reason = "stop", stop
                    updates.extend(self.scheduler.finish_sequence(u.seq_id, stop))
                    continue
            if u.finish_reason is not None and seq.finish_reason is None:
                seq.finish_reason, seq.stop_reason = u.finish_reason, u.stop_reason
                if u.finish_reason != "stop" or not isinstance(u.stop_reason, str):
                    seq.detok.add_tokens([], final=True)
        for st in changed.values():
            if all(s.finish_reason is not None for s in st.seqs):
                st.finished = True
                st.metrics.finished_time = now
            if st.stream or st.finished:
                outputs.append(self._make_output(st))
            if st.finished:
                self._forget(st)
        if self.trace is not None:
            rec = dict(step=self._num_steps, time=now, num_tokens=so.total_num_tokens,
                       num_seqs=len(so.scheduled), num_steps=so.num_steps)
            rec.update(self.scheduler.step_stats())
            self.trace.append(rec)
        self._drop_idle_block()
        self._warn_preemptions()
        return outputs

    # At most one preemption warning per this many seconds (each names the running total).
    PREEMPTION_WARNING_INTERVAL_S = 60.0

    def _warn_preemptions(self) -> None:
        """A warning when sequences were preempted since the last one (at most one a minute): the
        cache could not hold every running sequence's next tokens, which costs throughput, and
        what to change."""
        n = self.scheduler.num_preemptions
        if n == self._preemptions_warned:
            return
        now = time.monotonic()
        if self._preemption_warned_at is not None and now - self._preemption_warned_at < self.PREEMPTION_WARNING_INTERVAL_S:
            return
        cfg = self.config
        mode = cfg.scheduler.preemption_mode
        fixes = [f"raise gpu_memory_utilization (now {cfg.cache.gpu_memory_utilization:.2f})",
                 f"lower max_num_seqs (now {cfg.scheduler.max_num_seqs})"]
        if cfg.cache.kv_cache_dtype == "auto":
            fixes.append("use kv_cache_dtype='fp8' (twice the tokens in the same memory)")
        fixes.append("spread the model over more GPUs (tensor_parallel_size)")
        logger.warning(
            "KV cache full: %d sequence(s) preempted so far (%s: %s), which costs throughput. The cache holds "
            "%d tokens; to avoid preemption %s.", n, mode,
            "their tokens are computed again when they resume" if mode == "recompute"
            else "their blocks go to host memory and back", (self.runner.num_blocks - 1) * self.scheduler.block_size,
            ", ".join(fixes[:-1]) + " or " + fixes[-1])
        self._preemptions_warned, self._preemption_warned_at = n, now

    def _fill_prompt_ids(self, so) -> None:
        """The runner needs the prompt for prompt logprobs."""
        for sr in so.scheduled:
            st_ = sr.sampling
            if st_.prompt_logprobs >= 0 and not st_.prompt_token_ids:
                owner = self._owner(sr.req_id)
                if owner is not None:
                    st_.prompt_token_ids = self._requests[owner[0]].prompt_token_ids

    def _drop_idle_block(self) -> None:
        """A dispatched block whose sequences have all finished or been aborted: wait for it
        (its writes land in freed blocks before any later step runs) and drop its results."""
        if self._inflight is not None and not self.scheduler.has_unfinished_requests():
            self.runner.collect(self._inflight[1])
            self._inflight = None

    def _owner(self, seq_id: str):
        o = self._seq_owner.get(seq_id)
        if o is None and seq_id in self._requests:
            return (seq_id, 0)
        return o

    def _append_logprobs(self, seq: _Seq, ro, row: Optional[int]) -> None:
        if row is None or ro.sampled_logprobs is None:
            return
        lp = float(ro.sampled_logprobs[row])
        seq.cumulative_logprob += lp
        if seq.logprobs is None:
            return
        tok = int(ro.sampled_token_ids[row])
        k = seq.num_logprobs
        d = {}
        for j in range(k):
            t = int(ro.top_token_ids[row, j])
            d[t] = Logprob(float(ro.top_logprobs[row, j]), j + 1, decode_token(self.tokenizer, t))
        d[tok] = Logprob(lp, int(ro.sampled_ranks[row]), decode_token(self.tokenizer, tok))
        seq.logprobs.append(d)

    def _take_prompt_logprobs(self, ro) -> None:
        for seq_id, (start, lp, top_ids, top_lps, ranks) in ro.prompt_logprobs.items():
            owner = self._owner(seq_id)
            if owner is None:
                continue
            st = self._requests[owner[0]]
            if st.prompt_logprobs is None:
                continue
            k = st.params.prompt_logprobs or 0
            for j in range(len(lp)):
                p = start + j + 1  # logprob of prompt[p]
                if p >= len(st.prompt_token_ids) or st.prompt_logprobs[p] is not None:
                    continue
                tok = st.prompt_token_ids[p]
                d = {int(top_ids[j, i]): Logprob(float(top_lps[j, i]), i + 1,
                                                 decode_token(self.tokenizer, int(top_ids[j, i])))
                     for i in range(k)}
                d[tok] = Logprob(float(lp[j]), int(ranks[j]), decode_token(self.tokenizer, tok))
                st.prompt_logprobs[p] = d

    def _make_output(self, st: _ReqState) -> RequestOutput:
        outs = []
        for s in st.seqs:
            fin = s.finish_reason is not None
            outs.append(CompletionOutput(
                index=s.index, text=s.detok.visible_text(fin), token_ids=list(s.token_ids),
                cumulative_logprob=s.cumulative_logprob if s.logprobs is not None else None,
                logprobs=list(s.logprobs) if s.logprobs is not None else None,
                finish_reason=s.finish_reason, stop_reason=s.stop_reason))
        return RequestOutput(request_id=st.request_id, prompt=st.prompt,
                             prompt_token_ids=st.prompt_token_ids, outputs=outs, finished=st.finished,
                             prompt_logprobs=list(st.prompt_logprobs) if st.prompt_logprobs is not None else None,
                             num_cached_tokens=st.num_cached_tokens, metrics=st.metrics)

    # ---- stats ------------------------------------------------------------------------------
    def get_stats(self) -> EngineStats:
        s = self.scheduler
        return EngineStats(
            num_running=s.num_running, num_waiting=s.num_waiting, num_swapped=s.num_swapped,
            kv_cache_usage=s.kv_usage(), prompt_tokens_total=self._prompt_tokens_total,
            generation_tokens_total=self._generation_tokens_total,
            prefix_cache_queries=s.prefix_queries, prefix_cache_hits=s.prefix_hits,
            num_preemptions_total=s.num_preemptions, num_compilations=self.runner.num_compilations(),
            num_steps=self._num_steps, num_async_steps=s.num_async_blocks,
            spec_num_drafts=s.num_spec_drafts, spec_num_draft_tokens=s.num_spec_draft_tokens,
            spec_num_accepted_tokens=s.num_spec_accepted_tokens)


def _write_pending_tokens(so, ro) -> None:
    """A step scheduled ahead of its predecessor's results: its rows holding PENDING_TOKEN take
    the token the predecessor sampled for that sequence (a dispatched step got it on the device;
    this is the host's record, and the ids of a step not dispatched yet)."""
    rows = so.pending_token_rows or ()
    if not rows:
        return
    sampled = dict(zip(ro.req_ids, np.asarray(ro.sampled_token_ids).tolist()))  # a single step: [n]
    for i in rows:
        sr = so.scheduled[i]
        tok = sampled[sr.req_id]
        sr.token_ids = [tok]
