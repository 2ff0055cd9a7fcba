"""ModelRunner: owns the params and the paged KV cache; turns a SchedulerOutput into one jitted
step (embed -> layers -> logits at each sequence's last token -> on-device sampling) and hands
back only the sampled token ids and logprobs.

Static shapes: the step is compiled for a small set of token buckets (the sequence bucket is
derived from the token bucket), all at warm-up; `num_compilations()` lets tests prove serving
never compiles. The KV cache is donated into every call and never copied.
"""
from __future__ import annotations

import importlib.util
import logging
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.config import EngineConfig
from jaxserve.core.sched_output import ModelRunnerOutput, SchedulerOutput
from jaxserve.models.attention import AttentionBackend, AttentionMetadata
from jaxserve.runner import kv_cache as kvc
from jaxserve.runner.input_batch import StepInputs, geometric_buckets, prepare_inputs
from jaxserve.runner.sampler import SamplingTensors, sample, token_logprobs
from jaxserve.runner.sampling_inputs import pack_sampling

logger = logging.getLogger("jaxserve")

_PAIR_BUCKETS = (8, 64, 512, 4096)
# Prompt logprobs are computed this many positions at a time ([rows, vocab] float32 temporaries).
_PROMPT_LOGPROB_ROWS = 256


def resolve_attention_backend(requested: str, platform: str) -> str:
    """"auto": the Pallas kernel on GPU when it is available, else the jnp reference."""
    if requested != "auto":
        return requested
    if platform == "gpu" and importlib.util.find_spec("pallas_kernels.ragged_paged_attention.kernel"):
        return "pallas"
    return "reference"


class ModelRunner:
    def __init__(self, config: EngineConfig, model, *, max_model_len: int, dtype, tp=None):
        from jaxserve.models import registry

        self.config = config
        self.model = model
        self.arch = model.arch
        self.module = registry.model_module(self.arch)
        self.params = model.params
        self.max_model_len = max_model_len
        self.device = jax.devices()[0]
        self.platform = self.device.platform
        self.backend_name = resolve_attention_backend(config.attention_backend, self.platform)
        self.tp = tp
        self.backend = AttentionBackend(self.backend_name, tp.mesh if tp is not None else None)
        sc = config.scheduler
        self.block_size = config.cache.block_size
        self.max_blocks_per_seq = -(-max_model_len // self.block_size)
        factor = 2 if self.platform == "gpu" else 4
        self.token_buckets = geometric_buckets(16, sc.max_num_batched_tokens, factor)
        self.max_num_seqs = sc.max_num_seqs
        self.max_logprobs = config.max_logprobs
        cache_dtype = dtype if config.cache.cache_dtype == "auto" else jnp.dtype(config.cache.cache_dtype)
        self.kv_spec = kvc.KVCacheSpec(self.arch.num_layers, self.arch.num_kv_heads, self.arch.head_dim,
                                       self.block_size, cache_dtype)
        self._step = jax.jit(self._step_fn, donate_argnums=(1,))
        self._logits = jax.jit(self._logits_fn)
        self.num_blocks = self._size_cache()
        self.kv_caches = kvc.allocate(self.kv_spec, self.num_blocks, tp.kv_sharding() if tp is not None else None)
        self.num_host_blocks = 0
        self._host_pool: Optional[np.ndarray] = None
        if sc.preemption_mode == "swap":
            self.num_host_blocks = int(config.cache.swap_space * kvc.GIB // self.kv_spec.bytes_per_block)

    # ---- sizing -----------------------------------------------------------------------------
    def seq_bucket(self, token_bucket: int) -> int:
        return min(token_bucket, self.max_num_seqs)

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
        logger.info("KV cache: %d blocks x %d tokens = %d tokens (%.2f GiB, %s); max concurrency at "
                    "max_model_len=%d: %.1fx", n, spec.block_size, (n - 1) * spec.block_size, gib, where,
                    self.max_model_len, (n - 1) * spec.block_size / self.max_model_len)
        return n

    def _activation_bytes(self) -> int:
        """Peak temporaries of the largest step, read from XLA's memory analysis on a tiny cache."""
        T = self.token_buckets[-1]
        tiny = kvc.allocate(self.kv_spec, 2)
        args = self._dummy_args(T, tiny)
        try:
            compiled = jax.jit(self._step_fn).lower(*args).compile()
            step = int(compiled.memory_analysis().temp_size_in_bytes)
        except Exception:  # memory analysis is best effort
            step = 2 * kvc.GIB
        # The sampler and prompt logprobs hold a few [rows, vocab] float32 arrays (sort, softmax);
        # GEMM autotuning at warm-up wants scratch too: keep max(2 GiB, 4%) free for it.
        rows = max(self.seq_bucket(T), _PROMPT_LOGPROB_ROWS)
        sampler = 8 * rows * self.arch.vocab_size * 4
        stats = self.device.memory_stats() or {}
        slack = max(2 * kvc.GIB, int(0.04 * stats.get("bytes_limit", 0)))
        return step + sampler + slack

    # ---- the jitted step --------------------------------------------------------------------
    def _step_fn(self, params, kv_caches, token_ids, positions, md, logits_indices):
        """token_ids/positions [T]; logits_indices [S] -> (logits [S, V], hidden [T, E], kv_caches)."""
        hidden, kv_caches = self.module.forward(params, self.arch, token_ids, positions, kv_caches, md,
                                                attn_backend=self.backend)
        logits = self.module.compute_logits(params, self.arch, hidden[logits_indices])
        return logits, hidden, kv_caches

    def _logits_fn(self, params, hidden, idx):
        return self.module.compute_logits(params, self.arch, hidden[idx])

    def _dummy_args(self, T: int, kv_caches):
        """All-padding inputs, transferred exactly as execute() transfers real ones (committed
        device arrays), so warm-up fills the same jit cache entries that serving hits."""
        S = self.seq_bucket(T)
        tok, pos, slots, bt, sl, qsl, li = jax.device_put((
            np.zeros(T, np.int32), np.zeros(T, np.int32), np.zeros(T, np.int32),
            np.zeros((S, self.max_blocks_per_seq), np.int32), np.zeros(S, np.int32), np.zeros(S + 1, np.int32),
            np.zeros(S, np.int32)))
        md = AttentionMetadata(slot_mapping=slots, block_tables=bt, seq_lens=sl, query_start_loc=qsl)
        return (self.params, kv_caches, tok, pos, md, li)

    # ---- warm-up ----------------------------------------------------------------------------
    def warmup(self) -> float:
        """Compile every bucket (step, sampler variants, prompt logprobs, block copies)."""
        t0 = time.perf_counter()
        for T in self.token_buckets:
            S = self.seq_bucket(T)
            args = self._dummy_args(T, self.kv_caches)
            logits, hidden, self.kv_caches = self._step(*args)
            for penalties in (False, True):
                sb = pack_sampling([None] * S, S, self.max_model_len)
                if penalties:
                    sb.arrays["prompt_ids"] = np.full((S, self.max_model_len), -1, np.int32)
                    sb.arrays["output_ids"] = np.full((S, self.max_model_len), -1, np.int32)
                out = sample(logits, SamplingTensors(**jax.device_put(sb.arrays)), penalties=penalties,
                             num_logprobs=self.max_logprobs)
            lg = self._logits(self.params, hidden, jnp.zeros(_PROMPT_LOGPROB_ROWS, jnp.int32))
            out2 = token_logprobs(lg, jnp.zeros(_PROMPT_LOGPROB_ROWS, jnp.int32), num_logprobs=self.max_logprobs)
            jax.block_until_ready((out, out2))
        for k in _PAIR_BUCKETS[:2]:
            z = jnp.zeros(k, jnp.int32)
            self.kv_caches = kvc.copy_blocks(self.kv_caches, z, z)
            if self.num_host_blocks:
                data = kvc.gather_blocks(self.kv_caches, z)
                self.kv_caches = kvc.scatter_blocks(self.kv_caches, z, data)
        jax.block_until_ready(self.kv_caches)
        dt = time.perf_counter() - t0
        logger.info("warm-up: compiled %d token buckets %s in %.1f s", len(self.token_buckets),
                    list(self.token_buckets), dt)
        return dt

    def num_compilations(self) -> int:
        fns = [self._step, self._logits, sample, token_logprobs, kvc.copy_blocks, kvc.gather_blocks,
               kvc.scatter_blocks]
        return sum(f._cache_size() for f in fns)

    # ---- block operations -------------------------------------------------------------------
    def _host(self) -> np.ndarray:
        if self._host_pool is None:
            s = self.kv_spec
            self._host_pool = np.zeros((s.num_layers, 2, self.num_host_blocks, s.block_size,
                                        s.num_kv_heads, s.head_dim), jnp.dtype(s.dtype))
        return self._host_pool

    def _apply_block_ops(self, so: SchedulerOutput) -> None:
        # Order matters: swap-out reads blocks the scheduler may have re-assigned this step.
        if so.swap_out:
            dev, host = zip(*so.swap_out)
            ids, _ = kvc.pad_pairs([(d, d) for d in dev], _PAIR_BUCKETS)
            data = np.asarray(kvc.gather_blocks(self.kv_caches, jnp.asarray(ids)))
            self._host()[:, :, list(host)] = data[:, :, :len(host)]
        if so.swap_in:
            host, dev = zip(*so.swap_in)
            ids, _ = kvc.pad_pairs([(d, d) for d in dev], _PAIR_BUCKETS)
            data = np.zeros(self._host()[:, :, :len(ids)].shape, self._host().dtype)
            data[:, :, :len(host)] = self._host()[:, :, list(host)]
            self.kv_caches = kvc.scatter_blocks(self.kv_caches, jnp.asarray(ids), jnp.asarray(data))
        if so.copy_blocks:
            src, dst = kvc.pad_pairs(so.copy_blocks, _PAIR_BUCKETS)
            self.kv_caches = kvc.copy_blocks(self.kv_caches, jnp.asarray(src), jnp.asarray(dst))

    # ---- one step ---------------------------------------------------------------------------
    def execute(self, so: SchedulerOutput) -> ModelRunnerOutput:
        self._apply_block_ops(so)
        if so.is_empty:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=np.zeros(0, np.int32))
        inp = prepare_inputs(so, block_size=self.block_size, max_blocks_per_seq=self.max_blocks_per_seq,
                             token_buckets=self.token_buckets,
                             seq_rows=self.seq_bucket)
        # One batched host-to-device transfer for all step inputs.
        tok, pos, slots, bt, sl, qsl, li = jax.device_put(
            (inp.token_ids, inp.positions, inp.slot_mapping, inp.block_tables, inp.seq_lens,
             inp.query_start_loc, inp.logits_indices))
        md = AttentionMetadata(slot_mapping=slots, block_tables=bt, seq_lens=sl, query_start_loc=qsl)
        logits, hidden, self.kv_caches = self._step(self.params, self.kv_caches, tok, pos, md, li)
        return self._sample(so, inp, logits, hidden)

    def _sample(self, so: SchedulerOutput, inp: StepInputs, logits, hidden) -> ModelRunnerOutput:
        S = len(inp.seq_lens)
        rows = inp.sample_rows
        states = [None] * S
        for i in rows:
            states[i] = so.scheduled[i].sampling
        sb = pack_sampling(states, S, self.max_model_len)
        toks, lp, rank, top_ids, top_lps = sample(
            logits, SamplingTensors(**jax.device_put(sb.arrays)), penalties=sb.penalties,
            num_logprobs=self.max_logprobs)
        want_lp = any(states[i].logprobs >= 0 for i in rows)
        # One device-to-host transfer: the token ids, plus logprobs only when someone asked.
        if want_lp:
            toks, lp, rank, top_ids, top_lps = jax.device_get((toks, lp, rank, top_ids, top_lps))
        else:
            toks = jax.device_get(toks)
        out = ModelRunnerOutput(req_ids=[so.scheduled[i].req_id for i in rows],
                                sampled_token_ids=np.asarray(toks)[rows])
        if want_lp:
            out.sampled_logprobs = lp[rows]
            out.sampled_ranks = rank[rows]
            out.top_token_ids = top_ids[rows]
            out.top_logprobs = top_lps[rows]
        self._prompt_logprobs(so, inp, hidden, out)
        return out

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
        R = _PROMPT_LOGPROB_ROWS
        parts = []
        for c in range(0, len(idx), R):
            idx_p = np.zeros(R, np.int32)
            tgt_p = np.zeros(R, np.int32)
            n = min(R, len(idx) - c)
            idx_p[:n] = idx[c:c + n]
            tgt_p[:n] = tgt[c:c + n]
            lg = self._logits(self.params, hidden, jnp.asarray(idx_p))
            parts.append([np.asarray(a)[:n] for a in token_logprobs(
                lg, jnp.asarray(tgt_p), num_logprobs=self.max_logprobs)])
        lp, rank, top_ids, top_lps = (np.concatenate([p[i] for p in parts]) for i in range(4))
        off = 0
        for req_id, start, flat, _ in jobs:
            n = len(flat)
            sl = slice(off, off + n)
            out.prompt_logprobs[req_id] = (start, lp[sl], top_ids[sl], top_lps[sl], rank[sl])
            off += n
