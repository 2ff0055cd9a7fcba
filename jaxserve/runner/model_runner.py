"""ModelRunner: owns the params and the paged KV cache; turns a SchedulerOutput into one jitted
step (embed -> layers -> logits at each sequence's last token -> on-device sampling) and hands
back only the sampled token ids and logprobs.

Static shapes: the step is compiled for a small set of token buckets (the sequence bucket is
derived from the token bucket), all at warm-up; `num_compilations()` lets tests prove serving
never compiles (warm-up: warmup.py, a mixin of ModelRunner). The KV cache is donated into every
call and never copied.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from jaxserve.models.attention import AttentionBackend, AttentionMetadata
from jaxserve.runner import kv_cache as kvc
from jaxserve.runner.input_batch import (StepInputs, advance_decode, geometric_buckets, pack_step_meta,
                                         pick_bucket, prepare_inputs, step_meta_layout)
from jaxserve.runner.feed import feed, feed_rows, fill_tokens
from jaxserve.runner.sampler import PROMPT_LOGPROB_ROWS, SPEC_VERIFY_ROWS, sample, sample_tokens, token_logprobs
from jaxserve.runner.sampling_inputs import pack_sampling
from jaxserve.runner.warmup import Warmup
from jaxserve.parallel.plan import fetch, put, split_layers, to_host_async
from pallas_kernels.ragged_paged_attention import fresh_prompts

logger = logging.getLogger("jaxserve")

# Steps of more tokens than this compile with XLA's Triton GEMM emitter off (every GEMM a cuBLAS
# call): on an H200 that ran 128 / 128 and 1024 / 128 0.7-1.4% faster and started 13 s sooner (less
# autotuning), while batch-1 decode lost 6% without the Triton GEMVs, so small buckets keep them.
_TRITON_GEMM_MAX_TOKENS = 256
_LARGE_STEP_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def resolve_attention_backend(requested: str, platform: str) -> str:
    """"auto": the Pallas kernel on GPU when it is available, else the jnp reference."""
    if requested != "auto":
        return requested
    if platform == "gpu" and importlib.util.find_spec("pallas_kernels.ragged_paged_attention.kernel"):
        return "pallas"
    return "reference"


class ModelRunner(Warmup):
    def __init__(self, config: EngineConfig, model, *, max_model_len: int, dtype, plan=None):
        from jaxserve.models import registry

        self.config = config
        self.model = model
        self.arch = model.arch
        self.module = registry.model_module(self.arch)
        self.params = model.params
        self.max_model_len = max_model_len
        self.device = jax.local_devices()[0]
        self.platform = self.device.platform
        self.backend_name = resolve_attention_backend(config.attention_backend, self.platform)
        # Pipeline stages: contiguous layer ranges, each a jitted function on its own devices.
        self.plan = plan
        L = self.arch.num_layers
        self.stages = split_layers(L, plan.pp) if plan is not None else (range(L),)
        self.last = len(self.stages) - 1
        self.backends = [AttentionBackend(self.backend_name, plan.stage_mesh(s) if plan is not None else None)
                         for s in range(len(self.stages))]
        self.backend = self.backends[0]
        # Steps with long prompts that start in them run a variant whose attention gives those
        # prompts to cuDNN (fresh_prompts.py): only prefill-heavy buckets, where the kernel splits
        # decodes off, and only on GPUs with cuDNN's packed attention, for plain attention.
        self.dense_prompts = (self.backend_name == "pallas" and self.platform == "gpu"
                              and fresh_prompts.supported(dtype, self.arch.head_dim, None,
                                                         getattr(self.arch, "sliding_window", None)))
        self.backends_dense = [dataclasses.replace(b, dense_prompts=True) for b in self.backends]
        self.stage_params = [self._stage_params(s) for s in range(len(self.stages))]
        head = "embed" if self.arch.tie_word_embeddings else "lm_head"
        self.head_params = {head: self.stage_params[self.last][head]}
        sc = config.scheduler
        self.block_size = config.cache.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        factor = 2 if self.platform == "gpu" else 4
        self.token_buckets = geometric_buckets(16, sc.max_num_batched_tokens, factor)
        self.max_num_seqs = sc.max_num_seqs
        self.max_logprobs = config.max_logprobs
        cache_dtype = kvc.cache_dtype(config.cache.kv_cache_dtype, dtype)
        if self.platform == "cpu" and cache_dtype != jnp.dtype(dtype):
            logger.warning("kv_cache_dtype=%s on the CPU: XLA's CPU backend has no float8 arithmetic and "
                           "re-types the whole cache on every write (~0.4 s per step for a 1 GiB cache); "
                           "a float8 cache is for GPUs (use kv_cache_dtype='auto' here, or a small "
                           "cpu_kv_cache_gib)", config.cache.kv_cache_dtype)
        self.kv_spec = kvc.KVCacheSpec(self.arch.num_layers, self.arch.num_kv_heads, self.arch.head_dim,
                                       self.block_size, cache_dtype)
        self._stage_jits = [jax.jit(functools.partial(self._stage_fn, s), donate_argnums=(1,))
                            for s in range(len(self.stages))]
        large = _LARGE_STEP_OPTIONS if self.platform == "gpu" else None  # (an NVIDIA-only XLA option)
        self._stage_jits_cublas = [jax.jit(functools.partial(self._stage_fn, s), donate_argnums=(1,),
                                           compiler_options=large)
                                   for s in range(len(self.stages))]
        # (dense buckets hold >= fresh_prompts.MIN_LEN tokens, all past _TRITON_GEMM_MAX_TOKENS)
        self._stage_jits_dense = [jax.jit(functools.partial(self._stage_fn, s, dense=True), donate_argnums=(1,),
                                          compiler_options=large)
                                  for s in range(len(self.stages))] if self.dense_prompts else []
        self._logits = jax.jit(self._logits_fn)
        # what _activation_bytes kept free (GPU sizing): the largest step's temporaries, and the rest
        self._reserved_step_bytes: Optional[int] = None
        self._reserved_spare_bytes = 0
        self.num_blocks = self._size_cache()
        self.kv_caches = kvc.allocate(self.kv_spec, self.num_blocks, self._kv_shardings())
        self.num_host_blocks = 0
        self._warmup_at = "warm-up"  # what warm-up is running (named when a step runs out of memory)
        self._host_pool: Optional[np.ndarray] = None
        self._packed_on_device: Optional[tuple] = None  # (host values, device copy): _sampling_args
        if sc.preemption_mode == "swap":
            kvc.check_swap_space(config.cache.swap_space, kvc.host_available_bytes())
            self.num_host_blocks = int(config.cache.swap_space * kvc.GIB // self.kv_spec.bytes_per_block)

    # ---- placement ----------------------------------------------------------------------------
    def _stage_params(self, s: int) -> dict:
        r = self.stages[s]
        p = {"layers": self.params["layers"][r.start:r.stop]}
        if s == 0:
            p["embed"] = self.params["embed"]
        if s == self.last:
            p["final_norm"] = self.params["final_norm"]
            if self.arch.tie_word_embeddings:
                p["embed"] = (self.params["embed"] if s == 0 else
                              jax.device_put(self.params["embed"], self.plan.head_sharding(self.module, self.arch)))
            else:
                p["lm_head"] = self.params["lm_head"]
        return p

    def _kv_shardings(self):
        """One sharding per layer: its stage's devices, split on the KV heads."""
        if self.plan is None:
            return None
        return [self.plan.kv_sharding(s) for s, r in enumerate(self.stages) for _ in r]

    def _put(self, tree, stage: int):
        """Host inputs (numpy) for a jitted call on stage `stage`'s devices. On one device they go
        to the call as they are and its C++ dispatch transfers them: 0.48-0.67x the host time of
        jax.device_put's Python path on an H200's host, where the puts had taken 0.57-0.94 ms of a
        4-bit decode step (docs/benchmarks.md, sixteenth session). On a mesh: put replicated, one
        batched transfer."""
        if self.plan is None:
            return tree
        return put(tree, self.plan.replicated(stage))

    def _on_device(self, tree, stage: int):
        """Host arrays put on stage `stage`'s devices as a step's outputs are: warm-up's stand-ins
        for samples still on the device (a numpy argument is another jit cache entry)."""
        return put(tree, self.plan.replicated(stage) if self.plan is not None else None)

    def _kv(self, s: int) -> list:
        r = self.stages[s]
        return self.kv_caches[r.start:r.stop]

    def _set_kv(self, s: int, new: list) -> None:
        r = self.stages[s]
        self.kv_caches[r.start:r.stop] = new

    # ---- sizing -----------------------------------------------------------------------------
    def seq_bucket(self, token_bucket: int) -> int:
        return min(token_bucket, self.max_num_seqs)

    def decode_buckets(self) -> tuple[int, ...]:
        """Token buckets a decode block can land in (one token per sequence)."""
        sc = self.config.scheduler
        top = pick_bucket(self.token_buckets, min(sc.max_num_seqs, sc.max_num_batched_tokens))
        return tuple(T for T in self.token_buckets if T <= top)

    def _size_cache(self) -> int:
        cc = self.config.cache
        spec = self.kv_spec
        if cc.num_gpu_blocks_override is not None:
            n = cc.num_gpu_blocks_override
            where = "override"
        elif self.platform == "cpu":
            n = kvc.num_blocks_for_cpu(spec, cc.cpu_kv_cache_gib)
            where = "host memory (cpu_kv_cache_gib rule)"
        else:
            act = self._activation_bytes()
            n = kvc.num_blocks_for_accelerator(spec, self.device, cc.gpu_memory_utilization, act)
            where = f"{self.device.device_kind}"
        kvc.check_fits(n, spec, self.max_model_len, where)
        gib = n * spec.bytes_per_block / kvc.GIB
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB of %s, %s); max concurrency at "
                    "max_model_len=%d: %.1fx", n, spec.block_size, (n - 1) * spec.block_size, gib,
                    jnp.dtype(spec.dtype).name, where, self.max_model_len,
                    (n - 1) * spec.block_size / self.max_model_len)
        return n

    def _activation_bytes(self) -> int:
        """Peak temporaries of the largest step, from XLA's memory analysis of the first stage
        (its devices hold the largest activations) cut to one and to two layers on a tiny cache:
        temporaries(L) = t(1) + (L - 1) x (t(2) - t(1)). Layers run one after another and reuse
        their buffers, so the per-layer term is ~0 in practice, and two small compiles take ~1 s
        where compiling the whole largest step took ~9 s of every cold start."""
        n0 = len(self.stages[0])
        try:
            t1 = self._step_temp_bytes(1)
            step = t1 if n0 == 1 else t1 + (n0 - 1) * max(0, self._step_temp_bytes(2) - t1)
        except Exception:  # memory analysis is best effort
            step = 2 * kvc.GIB
        T = self.token_buckets[-1]
        # The sampler and prompt logprobs hold a few [rows, vocab] float32 arrays (sort, softmax);
        # GEMM autotuning at warm-up wants scratch too: keep max(2 GiB, 4%) free for it.
        rows = max(self.seq_bucket(T), PROMPT_LOGPROB_ROWS)
        sampler = 8 * rows * self.arch.vocab_size * 4
        stats = self.device.memory_stats() or {}
        slack = max(2 * kvc.GIB, int(0.04 * stats.get("bytes_limit", 0)))
        self._reserved_step_bytes, self._reserved_spare_bytes = step, sampler + slack
        return step + sampler + slack

    # ---- the jitted stages --------------------------------------------------------------------
    def _step_temp_bytes(self, n: int) -> int:
        """XLA's temporaries for the largest bucket's first stage cut to its first n layers."""
        T = self.token_buckets[-1]
        tiny = kvc.allocate(dataclasses.replace(self.kv_spec, num_layers=n), 2,
                            self.plan.kv_sharding(0) if self.plan is not None else None)
        params, kv, tok, meta = self._stage_args(0, self._dummy_inputs(T), tiny)
        params = dict(params, layers=params["layers"][:n])
        fn = functools.partial(self._stage_fn, 0, layers=range(n))
        # Only the buffer plan is wanted, not a fast program: no GEMM autotuning (with it, the
        # cache-sizing phase of a cold start took 58 s with float8 weights on an H200, 8 s bf16).
        opts = {**(_LARGE_STEP_OPTIONS if T > _TRITON_GEMM_MAX_TOKENS else {}), "xla_gpu_autotune_level": 0}
        compiled = jax.jit(fn).lower(params, kv, tok, meta).compile(compiler_options=opts)
        return int(compiled.memory_analysis().temp_size_in_bytes)

    def _stage_fn(self, s: int, params, kv_caches, x, meta, layers=None, dense: bool = False):
        """One pipeline stage (the whole model when there is one stage); dense: the variant for
        steps with long prompts that start in them (dense_bucket, has_dense_prompts).

        x: token_ids [T] on the first stage, else the previous stage's hidden [T, E];
        meta: the step's metadata packed by input_batch.pack_step_meta. Returns ((logits [S, V],
        hidden [T, E]) on the last stage, else hidden [T, E]; and this stage's kv_caches)."""
        first, last = s == 0, s == self.last
        positions, md, logits_indices = _unpack_meta(meta, x.shape[0], self.max_blocks_per_seq)
        hidden, kv_caches = self.module.forward(
            params, self.arch, x if first else None, positions, kv_caches, md,
            attn_backend=(self.backends_dense if dense else self.backends)[s],
            layers=layers or self.stages[s], hidden=None if first else x)
        if not last:
            return hidden, kv_caches
        logits = self.module.compute_logits(params, self.arch, hidden[logits_indices])
        return (logits, hidden), kv_caches

    def _logits_fn(self, head_params, hidden, idx):
        return self.module.compute_logits(head_params, self.arch, hidden[idx])

    def _dummy_inputs(self, T: int) -> StepInputs:
        S = self.seq_bucket(T)
        z = lambda *shape: np.zeros(shape, np.int32)  # noqa: E731
        return StepInputs(z(T), z(T), z(T), z(S, self.max_blocks_per_seq), z(S), z(S + 1), z(S), 0, 0, [])

    def _stage_args(self, s: int, inp: StepInputs, kv, x=None, tokens=None):
        """The arguments of stage s, transferred exactly as in serving (warm-up and execute share
        this, so warm-up fills the jit cache entries that serving hits). tokens: token ids already
        on a device (fed from the samples of a step still running there)."""
        if s == 0 and tokens is None:  # token ids and metadata from the host: one batched put
            tok, meta = self._put((inp.token_ids, pack_step_meta(inp)), s)
        else:
            meta = self._stage_meta(s, inp)
            if s > 0:
                tok = jax.device_put(x, self.plan.replicated(s))  # the previous stage's hidden state
            else:
                tok = tokens if self.plan is None else jax.device_put(tokens, self.plan.replicated(0))
        return (self.stage_params[s], kv, tok, meta)

    def _stage_jit(self, s: int, T: int, dense: bool = False):
        """Stage s's jitted step for token bucket T (larger buckets compile without Triton GEMMs);
        dense: the variant with long prompts through cuDNN (only for dense_bucket(T))."""
        if dense:
            return self._stage_jits_dense[s]
        return self._stage_jits[s] if T <= _TRITON_GEMM_MAX_TOKENS else self._stage_jits_cublas[s]

    def dense_bucket(self, T: int) -> bool:
        """Whether token bucket T has the dense-prompt variant: prefill-heavy (the kernel's
        split_decodes buckets, T > 2 S) and large enough for one prompt of MIN_LEN tokens."""
        return self.dense_prompts and T > 2 * self.seq_bucket(T) and fresh_prompts.max_segments(T) > 0

    def has_dense_prompts(self, inp: StepInputs) -> bool:
        """Whether this step has a prompt the dense variant would take (host-side, from the same
        arrays the device gets): its whole context in this step and >= MIN_LEN tokens."""
        return self.dense_bucket(len(inp.token_ids)) and fresh_prompts.any_taken(inp.seq_lens, inp.query_start_loc)

    def _stage_meta(self, s: int, inp: StepInputs):
        """The step's metadata on stage s's devices: one int32 vector, one transfer."""
        return self._put(pack_step_meta(inp), s)

    def _forward(self, inp: StepInputs, tokens=None, dense: Optional[bool] = None):
        """Dispatch every stage for one (micro)batch; returns (logits, hidden) without waiting.
        dense: run the dense-prompt variant (None: when the step has such prompts)."""
        x = None
        dense = self.has_dense_prompts(inp) if dense is None else dense
        for s in range(len(self.stages)):
            x, new = self._stage_jit(s, len(inp.token_ids), dense)(*self._stage_args(s, inp, self._kv(s), x, tokens))
            self._set_kv(s, new)
        return x

    # ---- block operations (per stage: each stage's layers live on its own devices) -----------
    def _copy_blocks(self, src: np.ndarray, dst: np.ndarray) -> None:
        for s in range(len(self.stages)):
            self._set_kv(s, kvc.copy_blocks(self._kv(s), *self._put((src, dst), s)))

    def _gather_blocks(self, ids: np.ndarray) -> list:
        """The blocks `ids` of every layer, gathered on each stage's devices and on their way to
        the host (read them with _fetch_blocks)."""
        return [to_host_async(kvc.gather_blocks(self._kv(s), self._put(ids, s))) for s in range(len(self.stages))]

    def _fetch_blocks(self, parts: list) -> np.ndarray:
        """-> [K, L, 2, BS, H, D] on the host (the stages' layers side by side)."""
        return np.concatenate([np.asarray(fetch(p, self.plan, s)) for s, p in enumerate(parts)], axis=1)

    def _scatter_blocks(self, ids: np.ndarray, data: np.ndarray) -> None:
        for s, r in enumerate(self.stages):
            self._set_kv(s, kvc.scatter_blocks(self._kv(s), *self._put((ids, data[:, r.start:r.stop]), s)))

    def _swap_out(self, pairs: list) -> None:
        """(device block, host slot) pairs: copy the blocks into the host pool, kvc.BLOCK_CHUNK at a
        time (the next chunk's gather and transfer are dispatched before the previous chunk lands)."""
        pool, pending = self._host(), []  # (gathered parts, host slots), in flight

        def land(parts, slots):
            pool[slots] = self._fetch_blocks(parts)[:len(slots)]
        for part in kvc.chunks(pairs):
            ids, _ = kvc.pad_pairs([(d, d) for d, _ in part])
            pending.append((self._gather_blocks(ids), [h for _, h in part]))
            if len(pending) == 2:
                land(*pending.pop(0))
        for p in pending:
            land(*p)

    def _swap_in(self, pairs: list) -> None:
        """(host slot, device block) pairs: write the slots back into the cache, kvc.BLOCK_CHUNK at
        a time; at most two chunks' transfers are in flight (each holds device memory the cache
        leaves little of)."""
        pool = self._host()
        for i, part in enumerate(kvc.chunks(pairs)):
            ids, _ = kvc.pad_pairs([(d, d) for _, d in part])
            slots = [h for h, _ in part]
            if len(slots) == len(ids) and slots == list(range(slots[0], slots[0] + len(slots))):
                data = pool[slots[0]:slots[0] + len(slots)]  # a view: no host copy before the transfer
            else:  # row by row (2 MB rows): a fancy-indexed gather plus a copy took 74 ms per chunk on the H200 host
                data = np.empty((len(ids),) + pool.shape[1:], pool.dtype)
                for j, h in enumerate(slots):
                    data[j] = pool[h]
                data[len(slots):] = 0  # padding rows go to the null block 0
            if i >= 2:
                jax.block_until_ready(self.kv_caches[0])
            self._scatter_blocks(ids, data)

    def _host(self) -> np.ndarray:
        """The host pool [host blocks, L, 2, BS, H, D], made on first use and touched whole at once
        (its pages faulted in here, not one swap chunk at a time while serving: a chunk's first
        landing took 108 ms against 28 ms after, on the H200 machine)."""
        if self._host_pool is None:
            s = self.kv_spec
            self._host_pool = np.empty((self.num_host_blocks, s.num_layers, 2, s.block_size, s.num_kv_heads,
                                        s.head_dim), jnp.dtype(s.dtype))
            self._host_pool.view(np.uint8).fill(0)
        return self._host_pool

    def _apply_block_ops(self, so: SchedulerOutput) -> None:
        # Order matters: swap-out reads blocks the scheduler may have re-assigned this step.
        if so.swap_out:
            self._swap_out(so.swap_out)
        if so.swap_in:
            self._swap_in(so.swap_in)
        for part in kvc.chunks(so.copy_blocks):
            self._copy_blocks(*kvc.pad_pairs(part))

    # ---- one step ---------------------------------------------------------------------------
    def _microbatches(self, so: SchedulerOutput) -> list[SchedulerOutput]:
        """With pipeline stages, split the step into up to one micro-batch per stage (contiguous
        sequences, balanced by tokens): stage s works on micro-batch i while stage s+1 works on
        i-1, since each stage's devices run their own queue of dispatched work."""
        n = min(len(self.stages), len(so.scheduled))
        if n <= 1:
            return [so]
        target = so.total_num_tokens / n
        parts, cur, acc = [], [], 0
        for i, sr in enumerate(so.scheduled):
            cur.append(sr)
            acc += len(sr.token_ids)
            left_seqs = len(so.scheduled) - i - 1
            if len(parts) < n - 1 and (acc >= target * (len(parts) + 1) or left_seqs == n - 1 - len(parts)):
                parts.append(cur)
                cur = []
        parts.append(cur)
        return [SchedulerOutput(scheduled=p, total_num_tokens=sum(len(r.token_ids) for r in p))
                for p in parts if p]

    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        return self.collect(self.dispatch(so))

    def async_step(self, so: SchedulerOutput) -> bool:
        """Whether a prefill / mixed step can be dispatched without waiting for its tokens: one
        pipeline stage, and nobody asked for logprobs (those come back with the tokens)."""
        return len(self.stages) == 1 and not any(
            (sr.sample and sr.sampling.logprobs >= 0) or sr.sampling.prompt_logprobs >= 0 or sr.spec_token_ids
            for sr in so.scheduled)

    def dispatch(self, so: SchedulerOutput, prev: Optional["PendingStep"] = None) -> "PendingStep":
        """Start one step. A decode block, and a step async_step allows, only dispatch their device
        work (and start copying the tokens to the host) and return at once; other steps run to
        completion here. prev: the step still on the device whose samples feed this one: a decode
        block's last samples (so.feed_rows), or a prefill / mixed step's (so.pending_token_rows)."""
        self._apply_block_ops(so)
        if so.is_empty:
            return PendingStep(so, out=ModelRunnerOutput(req_ids=[], sampled_token_ids=np.zeros(0, np.int32)))
        if so.decode_block:
            return self._dispatch_block(so, prev)
        if self.async_step(so):
            inp = prepare_inputs(so, block_size=self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
                                 token_buckets=self.token_buckets, seq_rows=self.seq_bucket)
            logits, _ = self._forward(inp, self._pending_tokens(so, inp, prev))
            sb, st = self._sampling_inputs(so, inp)
            toks = sample_tokens(logits, *st, penalties=sb.penalties, mode=sb.mode)
            if getattr(toks, "is_fully_addressable", True):
                toks.copy_to_host_async()
            return PendingStep(so, inp=inp, sampled=[toks], last=toks)
        want_lp = any(sr.sample and sr.sampling.logprobs >= 0 for sr in so.scheduled)
        dispatched = []
        for mb in self._microbatches(so):
            inp = prepare_inputs(mb, block_size=self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
                                 token_buckets=self.token_buckets, seq_rows=self.seq_bucket)
            dispatched.append((mb, inp, self._forward(inp)))
        outs = [self._sample(mb, inp, logits, hidden, want_lp) for mb, inp, (logits, hidden) in dispatched]
        return PendingStep(so, out=outs[0] if len(outs) == 1 else _merge(outs))

    def collect(self, p: "PendingStep") -> ModelRunnerOutput:
        """The step's results on the host (waits for the device when they are not back yet)."""
        if p.out is None:
            host = np.stack([np.asarray(t) for t in fetch(p.sampled, self.plan, self.last)], axis=1)  # [S, K]
            rows = p.inp.sample_rows
            host = host if p.so.decode_block else host[:, 0]  # a single step: [S]
            p.out = ModelRunnerOutput(req_ids=[p.so.scheduled[i].req_id for i in rows], sampled_token_ids=host[rows])
            p.sampled = None
        return p.out

    def _dispatch_block(self, so: SchedulerOutput, prev: Optional["PendingStep"]) -> "PendingStep":
        """so.num_steps decode steps, dispatched back to back: sub-step k's input tokens are
        sub-step k-1's samples, still on the device (sub-step 0's too when the block follows
        `prev` under async scheduling); the tokens come back in one transfer, started here. The
        scheduler only sends requests that need no per-token host decision (no penalties,
        logprobs or min_tokens), so the sampling state only moves its counters."""
        K = so.num_steps
        inp = prepare_inputs(so, block_size=self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
                             token_buckets=self.token_buckets, seq_rows=self.seq_bucket, lookahead=K - 1)
        T, S, n = len(inp.token_ids), len(inp.seq_lens), inp.num_seqs
        if so.feed_rows is not None:
            if prev is None or prev.last is None:
                raise ValueError("a block fed from the previous block needs that block's pending step")
            if prev.last.shape[0] == T and np.array_equal(so.feed_rows, np.arange(n)):
                tokens = prev.last  # every row where it was: the samples are the token ids (no feed program)
            else:
                rows = np.zeros(T, np.int32)
                rows[:n] = so.feed_rows
                tokens = feed_rows(prev.last, self._put(rows, self.last))
        else:
            tokens = self._pending_tokens(so, inp, prev)
        sb = pack_sampling([sr.sampling for sr in so.scheduled] + [None] * (S - n), S, self.max_model_len)
        assert not sb.penalties
        # The sampling arrays go over once (or not at all: the last block's when they are the same);
        # only the per-sequence PRNG counters move each sub-step.
        packed, counters = self._sampling_args(sb)
        sampled = []
        for k in range(K):
            step_inp = inp
            if k:
                pos, slots, sl = advance_decode(inp, k, self.block_size)
                step_inp = dataclasses.replace(inp, positions=pos, slot_mapping=slots, seq_lens=sl)
                counters = self._put(sb.arrays["counters"] + np.int32(k), self.last)
            logits, _ = self._forward(step_inp, tokens)
            toks = sample_tokens(logits, packed, counters, penalties=False, mode=sb.mode)
            sampled.append(toks)
            if k + 1 < K:
                tokens = toks if toks.shape[0] == T else feed(toks, T)
        for t in sampled:
            if getattr(t, "is_fully_addressable", True):
                t.copy_to_host_async()
        return PendingStep(so, inp=inp, sampled=sampled, last=sampled[-1])

    def _pending_tokens(self, so: SchedulerOutput, inp: StepInputs, prev: Optional["PendingStep"]):
        """Token ids [T] on the device for a step scheduled ahead of `prev`, a prefill / mixed step
        still on the device: each pending row (so.pending_token_rows, a one-token row) takes the
        token prev samples for its sequence, there; every other position the host's id. So the
        step is dispatched before prev's tokens are back and the device never waits for the host
        between the two. None (the host's ids as they are) when no row is pending."""
        rows = so.pending_token_rows
        if not rows:
            return None
        if prev is None or prev.last is None:
            raise ValueError("a step with pending tokens needs the pending step that samples them")
        prev_row = {sr.req_id: i for i, sr in enumerate(prev.so.scheduled)}  # row i samples into [i]
        enc = inp.token_ids.copy()  # [T]; a pending row's token -> -1 - (its row in prev's samples)
        for i in rows:
            enc[inp.query_start_loc[i]] = -1 - prev_row[so.scheduled[i].req_id]
        samples = feed(prev.last, self.seq_bucket(self.token_buckets[-1]))  # [S_max]: one shape
        return fill_tokens(self._put(enc, self.last), samples)

    def _sampling_inputs(self, so: SchedulerOutput, inp: StepInputs):
        """The sampling arrays of a step's sampling rows, packed (host) and put on the device."""
        S = len(inp.seq_lens)
        states = [None] * S
        for i in inp.sample_rows:
            states[i] = so.scheduled[i].sampling
        sb = pack_sampling(states, S, self.max_model_len)
        return sb, self._sampling_args(sb)

    def _sampling_args(self, sb, reuse: bool = True) -> tuple:
        """(packed, counters) of `sb` for the sampler's calls: packed on the device, the last call's
        copy when it holds the same values (from step to step of a decode batch only the counters
        move; a transfer costs the host ~60-250 us), counters as host arrays. reuse=False (warm-up's
        threads): a fresh copy, the cache untouched. Every sampler call takes its arguments from
        here, so warm-up and serving share one jit cache entry per variant."""
        packed, counters = sb.packed()
        hit = self._packed_on_device
        if not reuse or hit is None or hit[0].shape != packed.shape or not np.array_equal(hit[0], packed):
            hit = (packed, self._on_device(packed, self.last))
            if reuse:
                self._packed_on_device = hit
        return hit[1], self._put(counters, self.last)

    def _sample(self, so: SchedulerOutput, inp: StepInputs, logits, hidden, want_lp: bool) -> ModelRunnerOutput:
        rows = inp.sample_rows
        # proposals are checked in the same device queue, before this step's tokens are fetched
        check = self._check_proposals(so, inp, hidden) if any(sr.spec_token_ids for sr in so.scheduled) else None
        if check is not None and not want_lp and all(so.scheduled[i].spec_token_ids for i in rows):
            # every sampling row carries a proposal: its check samples the row's first token too
            spec = _accepted(*check, self.plan, self.last)
            out = ModelRunnerOutput(req_ids=[so.scheduled[i].req_id for i in rows],
                                    sampled_token_ids=np.asarray([spec[so.scheduled[i].req_id][0] for i in rows],
                                                                 np.int32), spec_token_ids=spec)
            self._prompt_logprobs(so, inp, hidden, out)
            return out
        sb, st = self._sampling_inputs(so, inp)
        # One device-to-host transfer: the token ids, plus logprobs only when someone asked (the
        # logprob work itself runs only then).
        if want_lp:
            res = sample(logits, *st, penalties=sb.penalties, num_logprobs=self.max_logprobs, mode="filtered")
            toks, lp, rank, top_ids, top_lps = fetch(res, self.plan, self.last)
        else:
            toks = fetch(sample_tokens(logits, *st, penalties=sb.penalties, mode=sb.mode), self.plan, self.last)
        out = ModelRunnerOutput(req_ids=[so.scheduled[i].req_id for i in rows],
                                sampled_token_ids=np.asarray(toks)[rows])
        if want_lp:
            out.sampled_logprobs = lp[rows]
            out.sampled_ranks = rank[rows]
            out.top_token_ids = top_ids[rows]
            out.top_logprobs = top_lps[rows]
        self._prompt_logprobs(so, inp, hidden, out)
        if check is not None:
            out.spec_token_ids = _accepted(*check, self.plan, self.last)
        return out

    def _check_proposals(self, so: SchedulerOutput, inp: StepInputs, hidden):
        """Speculative decoding: at each position of a row with proposed tokens (its fed token and
        every proposal; position j predicts token j + 1), the token the model samples there with
        the PRNG counter that token has without speculation. Dispatched only: returns (the samples
        on the device, the rows' spans) for _accepted. With a proposal that is a single token (no
        draft distribution), accepting it exactly when the model's own sample equals it is
        speculative sampling's rule (accept with probability p(x); on rejection, a sample of p
        without x), so outputs are those of decoding without speculation (in exact arithmetic; on a
        GPU up to the rounding of these other programs at near-ties: docs/ARCHITECTURE.md)."""
        idx, states, spans = [], [], []
        for i, sr in enumerate(so.scheduled):
            d = sr.spec_token_ids
            if not d:
                continue
            spans.append((sr.req_id, len(idx), d))
            for j in range(len(d) + 1):
                idx.append(int(inp.query_start_loc[i]) + j)
                st = sr.sampling.clone()
                st.num_output_tokens += j
                states.append(st)
        if len(idx) > SPEC_VERIFY_ROWS[-1]:  # (the scheduler keeps a step's proposals within these)
            raise ValueError(f"{len(idx)} positions to verify, more than the {SPEC_VERIFY_ROWS[-1]} compiled rows")
        R = next(r for r in SPEC_VERIFY_ROWS if r >= len(idx))
        rows = np.zeros(R, np.int32)
        rows[:len(idx)] = idx
        logits = self._logits(self.head_params, hidden, self._put(rows, self.last))  # [R, V]
        sb = pack_sampling(states + [None] * (R - len(states)), R, self.max_model_len)
        toks = sample_tokens(logits, *self._sampling_args(sb), penalties=False, mode=sb.mode)
        if getattr(toks, "is_fully_addressable", True):
            toks.copy_to_host_async()
        return toks, spans

    def _prompt_logprobs(self, so: SchedulerOutput, inp: StepInputs, hidden, out: ModelRunnerOutput):
        jobs = []  # (req_id, first position, flat token indices, targets)
        for i, sr in enumerate(so.scheduled):
            st = sr.sampling
            if st.prompt_logprobs < 0 or not st.prompt_token_ids:
                continue
            prompt = st.prompt_token_ids
            start = sr.num_computed_tokens
            end = min(start + len(sr.token_ids), len(prompt) - 1)
            if end <= start:
                continue
            flat = inp.query_start_loc[i] + np.arange(end - start)
            jobs.append((sr.req_id, start, flat, np.asarray(prompt[start + 1:end + 1], np.int32)))
        if not jobs:
            return
        idx = np.concatenate([j[2] for j in jobs]).astype(np.int32)
        tgt = np.concatenate([j[3] for j in jobs]).astype(np.int32)
        R = PROMPT_LOGPROB_ROWS
        parts = []
        for c in range(0, len(idx), R):
            idx_p = np.zeros(R, np.int32)
            tgt_p = np.zeros(R, np.int32)
            n = min(R, len(idx) - c)
            idx_p[:n] = idx[c:c + n]
            tgt_p[:n] = tgt[c:c + n]
            lg = self._logits(self.head_params, hidden, self._put(idx_p, self.last))
            res = fetch(token_logprobs(lg, self._put(tgt_p, self.last), num_logprobs=self.max_logprobs),
                        self.plan, self.last)
            parts.append([np.asarray(a)[:n] for a in res])
        lp, rank, top_ids, top_lps = (np.concatenate([p[i] for p in parts]) for i in range(4))
        off = 0
        for req_id, start, flat, _ in jobs:
            n = len(flat)
            sl = slice(off, off + n)
            out.prompt_logprobs[req_id] = (start, lp[sl], top_ids[sl], top_lps[sl], rank[sl])
            off += n


@dataclasses.dataclass
class PendingStep:
    """A dispatched step: its results (out), or the device arrays they will come from."""

    so: SchedulerOutput
    out: Optional[ModelRunnerOutput] = None
    inp: Optional[StepInputs] = None
    sampled: Optional[list] = None  # per sub-step [S] token ids on the device
    last: Optional[jax.Array] = None  # the last sub-step's samples (feeds a following block)


def _unpack_meta(meta, num_tokens: int, max_blocks_per_seq: int):
    """pack_step_meta's vector [2T + S*MB + 3S + 1] -> (positions [T], AttentionMetadata,
    logits_indices [S]); static slices, which XLA folds into their consumers."""
    sizes = step_meta_layout(meta.shape[0], num_tokens, max_blocks_per_seq)
    parts, o = [], 0
    for n in sizes:
        parts.append(meta[o:o + n])
        o += n
    pos, slots, bt, sl, qsl, li = parts
    md = AttentionMetadata(slot_mapping=slots, block_tables=bt.reshape(sizes[3], max_blocks_per_seq), seq_lens=sl,
                           query_start_loc=qsl)
    return pos, md, li


def _accepted(samples, spans, plan, stage: int) -> dict[str, list[int]]:
    """_check_proposals' samples -> each row's emitted tokens: its samples up to and including
    the first that differs from its proposal (all k + 1 when every proposed token matched)."""
    toks = np.asarray(fetch(samples, plan, stage)).tolist()
    out = {}
    for req_id, o, d in spans:
        s = toks[o:o + len(d) + 1]
        a = 0
        while a < len(d) and s[a] == d[a]:
            a += 1
        out[req_id] = s[:a + 1]
    return out


def _merge(outs: list[ModelRunnerOutput]) -> ModelRunnerOutput:
    """Micro-batch outputs -> one, in scheduled order."""
    cat = lambda name: (None if getattr(outs[0], name) is None  # noqa: E731
                        else np.concatenate([getattr(o, name) for o in outs]))
    merged = ModelRunnerOutput(req_ids=[r for o in outs for r in o.req_ids],
                               sampled_token_ids=cat("sampled_token_ids"), sampled_logprobs=cat("sampled_logprobs"),
                               top_token_ids=cat("top_token_ids"), top_logprobs=cat("top_logprobs"),
                               sampled_ranks=cat("sampled_ranks"))
    for o in outs:
        merged.prompt_logprobs.update(o.prompt_logprobs)
        merged.spec_token_ids.update(o.spec_token_ids)
    return merged
