"""Warm-up of the ModelRunner (a mixin of it): compile every token bucket's step, the sampler
variants, the prompt-logprobs head and the device-side token feeds before the first request
(on threads into the persistent compilation cache first, then one ordered pass that runs each),
so serving never compiles; and recover from a warm-up step that runs out of device memory by
giving the KV cache's memory back.

The methods use the runner's state (stages, buckets, KV cache, jitted stages); they live here so
that model_runner.py holds the step itself.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxserve.runner import kv_cache as kvc
from jaxserve.runner.feed import feed, feed_rows, fill_tokens
from jaxserve.runner.sampler import PROMPT_LOGPROB_ROWS, SPEC_VERIFY_ROWS, sample, sample_tokens, token_logprobs
from jaxserve.runner.sampling_inputs import pack_sampling

logger = logging.getLogger("jaxserve")

# The sampler variants the runner dispatches (see sampler.py): (penalties, mode, logprobs) --
# tokens only in each mode without penalties, "filtered" with them; with logprobs "filtered".
SAMPLER_VARIANTS = ((False, "greedy", False), (False, "random", False), (False, "biased", False),
                    (False, "filtered", False),
                    (True, "filtered", False), (False, "filtered", True), (True, "filtered", True))
# Warm-up steps that run out of device memory: the KV cache gives back what the step asked for
# (and a quarter more) plus OOM_MARGIN_BYTES, at least OOM_MIN_SHARE of itself, at most
# OOM_RETRIES times.
OOM_MARGIN_BYTES = 256 << 20
OOM_RETRIES = 3
OOM_MIN_SHARE = 0.05


class _StepWillNotFit(Exception):
    """A compiled program's temporaries exceed the memory the KV cache left (found before running it)."""

    def __init__(self, needed: int):
        super().__init__(f"a compiled step needs {needed / kvc.GIB:.2f} GiB more than the KV cache leaves")
        self.needed = needed


def _temp_bytes(compiled) -> int:
    """A compiled program's temporaries from XLA's memory analysis (0 where it has none)."""
    try:
        return int(compiled.memory_analysis().temp_size_in_bytes)
    except Exception:  # noqa: BLE001 (memory analysis is best effort)
        return 0


class Warmup:
    def _precompile(self) -> int:
        """Compile every bucket's stages on a thread pool (XLA compiles outside the GIL) into the
        persistent compilation cache; the warm-up calls that follow load them instead of
        compiling one after another. Returns the bytes the largest compiled step lacks
        (_report_step_temps; 0 when it fits or nothing is known)."""
        from concurrent.futures import ThreadPoolExecutor

        jobs = self._step_jobs()

        def compile_one(job):
            T, s, dense = job
            inp = self._dummy_inputs(T)
            if s == 0:
                args = self._stage_args(0, inp, self._kv(0))
            else:  # the previous stage's hidden state, as an abstract value
                x = jax.ShapeDtypeStruct((T, self.arch.hidden_size), self.stage_params[0]["embed"].dtype,
                                         sharding=self.plan.replicated(s))
                args = (self.stage_params[s], self._kv(s), x, self._stage_meta(s, inp))
            return self._stage_jit(s, T, dense).lower(*args).compile()

        with ThreadPoolExecutor(max(1, self.config.warmup_compile_threads)) as pool:
            if self.plan is None:
                # Every abstract value is known up front (logits [S, V] float32, hidden [T, E]):
                # one queue, the longest compiles (largest buckets) first and the many small
                # sampler / head / feed compiles filling the threads the last steps leave idle.
                steps = [pool.submit(compile_one, j) for j in reversed(jobs)]
                logits = {self.seq_bucket(T): jax.ShapeDtypeStruct((self.seq_bucket(T), self.arch.vocab_size),
                                                                   jnp.float32) for T in self.token_buckets}
                hidden = [jax.ShapeDtypeStruct((T, self.arch.hidden_size), self.stage_params[0]["embed"].dtype)
                          for T in self.token_buckets]
                side = [pool.submit(self._precompile_sampler, (S, out, v))
                        for S, out in logits.items() for v in SAMPLER_VARIANTS]
                side += [pool.submit(self._precompile_prompt_head, h) for h in hidden]
                if self.config.scheduler.async_scheduling:
                    side += [pool.submit(self._precompile_feed_rows, pair) for pair in self._feed_pairs()]
                compiled = [f.result() for f in steps]
                samplers = []
                try:
                    samplers = [f.result() for f in side][:len(logits) * len(SAMPLER_VARIANTS)]
                except Exception as e:  # noqa: BLE001 (any failure just leaves the work to warm-up)
                    logger.warning("warm-up: precompiling the sampler failed (%s); compiling it in order", e)
                return self._report_step_temps(list(reversed(jobs)), compiled, samplers)
            compiled = list(pool.map(compile_one, jobs))
            samplers = []
            # Then the sampler variants, once per sequence bucket, from the logits' abstract
            # value (its sharding as the mesh step returns it): they too compile into the cache
            # instead of one after another below. Only an optimization: on any failure the
            # warm-up compiles them itself.
            try:
                outs = {T: c.out_info[0] for (T, s, _), c in zip(jobs, compiled) if s == self.last}
                logits = {self.seq_bucket(T): o[0] for T, o in outs.items()}
                samplers = list(pool.map(self._precompile_sampler, [(S, out, v) for S, out in logits.items()
                                                                    for v in SAMPLER_VARIANTS]))
                list(pool.map(self._precompile_prompt_head, [o[1] for o in outs.values()]))
                if self.config.scheduler.async_scheduling:
                    list(pool.map(self._precompile_feed_rows, self._feed_pairs()))
            except Exception as e:  # noqa: BLE001 (any failure just leaves the work to warm-up)
                logger.warning("warm-up: precompiling the sampler failed (%s); compiling it in order", e)
        return self._report_step_temps(jobs, compiled, samplers)

    def _step_jobs(self) -> list[tuple[int, int, bool]]:
        """Every compiled step variant: (token bucket, stage, dense-prompt variant)."""
        return [(T, s, d) for T in self.token_buckets for d in (False, True) if not d or self.dense_bucket(T)
                for s in range(len(self.stages))]

    def _report_step_temps(self, jobs, compiled, samplers=()) -> int:
        """Log the largest temporaries among the compiled (autotuned) steps and sampler variants
        next to what the cache sizing reserved (its estimate compiles the largest bucket without
        autotuning) and the device's largest free block. Returns what the largest of them lacks
        (0 if nothing or nothing is known): XLA allocates a program's temporaries as one block, so
        it must fit in the largest free block where the allocator reports it, else in the whole
        reserve. Such a program would run out of memory at warm-up (float8 weights on an H200: the
        sampler's 3.91 GiB at 1,024 rows, after ~40 s of the allocator retrying), so warm-up gives
        the cache's memory back before running it."""
        temps = [(b, T, s) for (T, s, _), c in zip(jobs, compiled) if (b := _temp_bytes(c))]
        if not temps:
            return 0
        top, T, s = max(temps)
        big, S = max(samplers, default=(0, 0))
        free = kvc.contiguous_free_bytes(self._device_memory_stats())
        logger.info("warm-up: the largest step temporaries: %.2f GiB at token bucket %d (stage %d)%s%s%s",
                    top / kvc.GIB, T, s,
                    f"; the sampler's: {big / kvc.GIB:.2f} GiB at {S} rows" if big else "",
                    "" if self._reserved_step_bytes is None else
                    f"; the cache sizing reserved {self._reserved_step_bytes / kvc.GIB:.2f} GiB for a step "
                    f"and {self._reserved_spare_bytes / kvc.GIB:.2f} GiB besides",
                    "" if free is None else f"; the largest free block is {free / kvc.GIB:.2f} GiB")
        need, what = max((top, f"token bucket {T}"), (big, f"the sampler at {S} rows"))
        if free is not None:
            kept = free
        elif self._reserved_step_bytes is not None:
            need, what = top, f"token bucket {T}"
            kept = self._reserved_step_bytes + self._reserved_spare_bytes
        else:
            return 0
        if need <= kept:
            return 0
        logger.warning("warm-up: %s needs %.2f GiB of temporaries in one block, more than the %.2f GiB "
                       "the KV cache left", what, need / kvc.GIB, kept / kvc.GIB)
        self._warmup_at = f"{what}, before running it"
        return need - kept

    def _device_memory_stats(self) -> dict:
        return self.device.memory_stats() or {}

    def _abstract_output(self, out) -> jax.ShapeDtypeStruct:
        """A step output's abstract value as the runtime array will be: single-device steps
        return uncommitted arrays (their inputs are), and a committed abstract value would lower
        to another cache key; mesh steps return committed ones."""
        return jax.ShapeDtypeStruct(out.shape, out.dtype, sharding=out.sharding if self.plan is not None else None)

    def _precompile_sampler(self, item) -> tuple[int, int]:
        """One sampler variant (penalties, mode, logprobs) of sequence bucket S -> (its
        temporaries in bytes (0 if unknown), S)."""
        S, out, (penalties, mode, lp) = item
        logits = self._abstract_output(out)
        st = self._sampling_args(self._dummy_sampling(S, penalties), reuse=False)
        if lp:
            c = sample.lower(logits, *st, penalties=penalties, num_logprobs=self.max_logprobs, mode=mode).compile()
        else:
            c = sample_tokens.lower(logits, *st, penalties=penalties, mode=mode).compile()
        return _temp_bytes(c), S

    def _precompile_prompt_head(self, out) -> None:
        """The prompt-logprobs head of one bucket: logits of selected hidden rows."""
        hidden = self._abstract_output(out)
        self._logits.lower(self.head_params, hidden, self._put(np.zeros(PROMPT_LOGPROB_ROWS, np.int32),
                                                               self.last)).compile()

    def _feed_pairs(self) -> list[tuple[int, int]]:
        """(previous block's token bucket, next block's) pairs async scheduling can chain: the next
        block holds a subset of the previous one's sequences."""
        decode = self.decode_buckets()
        return [(Tp, T) for Tp in decode for T in decode if T <= Tp]

    def _precompile_feed_rows(self, pair) -> None:
        Tp, T = pair
        abstract = lambda n: jax.ShapeDtypeStruct(  # noqa: E731 (as the runtime arrays are placed)
            (n,), jnp.int32, sharding=self.plan.replicated(self.last) if self.plan is not None else None)
        feed_rows.lower(abstract(self.seq_bucket(Tp)), abstract(T)).compile()

    def _dummy_sampling(self, S: int, penalties: bool):
        sb = pack_sampling([None] * S, S, self.max_model_len)
        if penalties:
            sb.arrays["prompt_ids"] = np.full((S, self.max_model_len), -1, np.int32)
            sb.arrays["output_ids"] = np.full((S, self.max_model_len), -1, np.int32)
        return sb

    def warmup(self, parallel: bool = False) -> float:
        """Compile and run every bucket once (stages, sampler variants, prompt logprobs, block
        copies). parallel: compile the stages on threads into the persistent cache first.

        The KV cache was sized from XLA's memory analysis of the largest step; a smaller bucket can
        still peak higher (float8 weights on an H200: a decode bucket asked for 3.9 GiB more). A
        step that runs out of device memory here makes the cache give that memory back (at least
        5% of it: each restart recompiles every bucket) and warm-up start over, so the engine
        comes up with a smaller cache instead of failing its first large batch; with the cache
        size fixed by the user (num_gpu_blocks_override), too small to give more, or after
        OOM_RETRIES tries, StepOutOfMemoryError says what to lower."""
        t0 = time.perf_counter()
        for attempt in range(OOM_RETRIES + 1):
            try:
                self._run_every_bucket(parallel, t0, may_shrink=attempt < OOM_RETRIES)
                break
            except _StepWillNotFit as e:
                self._shrink_cache_for(e, final=False, asked=e.needed)
            except jax.errors.JaxRuntimeError as e:
                if "RESOURCE_EXHAUSTED" not in str(e):
                    raise
                self._shrink_cache_for(e, final=attempt == OOM_RETRIES)
        dt = time.perf_counter() - t0
        logger.info("warm-up: compiled %d token buckets %s in %.1f s", len(self.token_buckets),
                    list(self.token_buckets), dt)
        return dt

    def _shrink_cache_for(self, err: Exception, *, final: bool, asked: Optional[int] = None) -> None:
        """After a warm-up step ran out of device memory: reallocate the KV cache smaller by what
        the step asked for plus a margin, at least OOM_MIN_SHARE of the cache, or raise
        StepOutOfMemoryError when that is not allowed or would leave too small a cache."""
        cc, sc = self.config.cache, self.config.scheduler
        have = self.num_blocks
        # this device's bytes per block: every layer it holds (a shard of the KV heads under a
        # mesh), from the arrays' shapes and shardings alone (the failed step may have left them
        # deleted or in error)
        per_block = max(1, sum(math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize
                               for a in self.kv_caches if self.device in a.sharding.device_set) // have)
        if asked is None:
            asked = kvc.requested_bytes(str(err))
        # Every restart recompiles every bucket (the cache's shape is in each step's signature:
        # 40-150 s on an H200), so give back at least OOM_MIN_SHARE of the cache at once: float8
        # weights asked for 0.99 GiB (GEMM autotuning) and then 3.92 GiB, two restarts where one would do.
        give = max(int((asked or 0) * 1.25) + OOM_MARGIN_BYTES, int(OOM_MIN_SHARE * have * per_block))
        n = have - -(-give // per_block)
        usable = (n - 1) * self.block_size
        first_line = str(err).strip().splitlines()[0][:300]
        if final or cc.num_gpu_blocks_override is not None or usable < self.max_model_len:
            why = ("the cache size is fixed by num_gpu_blocks_override" if cc.num_gpu_blocks_override is not None
                   else f"still out of memory after giving the KV cache back {OOM_RETRIES} times" if final
                   else f"giving that back would leave {max(usable, 0)} tokens of KV cache, under "
                        f"max_model_len={self.max_model_len}")
            raise kvc.StepOutOfMemoryError(
                f"a compiled step ran out of device memory during warm-up (at {self._warmup_at}: {first_line}) "
                f"next to a KV cache of {have} blocks ({have * per_block / kvc.GIB:.2f} GiB per device); {why}. Lower "
                f"max_num_batched_tokens (now {sc.max_num_batched_tokens}: the largest step) or max_num_seqs "
                f"(now {sc.max_num_seqs}), or lower gpu_memory_utilization (now {cc.gpu_memory_utilization}) / "
                f"num_gpu_blocks_override, or use more devices (tensor_parallel_size)") from err
        stats = self._device_memory_stats()
        if "bytes_in_use" in stats:  # what else held the memory the sizing kept free (diagnosis)
            logger.info("warm-up: device memory at the failure: %.2f GiB in use (peak %.2f) of %.2f, the "
                        "largest free block %s; KV cache %.2f GiB", stats["bytes_in_use"] / kvc.GIB,
                        stats.get("peak_bytes_in_use", 0) / kvc.GIB, stats.get("bytes_limit", 0) / kvc.GIB,
                        f"{stats['largest_free_block_bytes'] / kvc.GIB:.2f} GiB"
                        if "largest_free_block_bytes" in stats else "unknown", have * per_block / kvc.GIB)
        logger.warning("warm-up: %s (%s, at %s); the KV cache gives back %.2f GiB: "
                       "%d -> %d blocks (%d tokens), and warm-up starts over",
                       "a compiled program would not fit" if isinstance(err, _StepWillNotFit)
                       else "a step ran out of device memory",
                       f"asked for {asked / kvc.GIB:.2f} GiB" if asked is not None else first_line,
                       self._warmup_at,
                       (have - n) * per_block / kvc.GIB, have, n, usable)
        for a in self.kv_caches:
            if not a.is_deleted():
                a.delete()
        self.kv_caches = kvc.allocate(self.kv_spec, n, self._kv_shardings())
        self.num_blocks = n

    def _run_every_bucket(self, parallel: bool, t0: float, may_shrink: bool = False) -> None:
        self._warmup_at = "the threaded precompile"
        if parallel and self.config.warmup_compile_threads > 1:
            try:
                deficit = self._precompile()
            except Exception as e:  # noqa: BLE001 (only an optimization: the ordered pass below compiles)
                # e.g. "Failed to launch ptxas" while 8 threads each spawn the assembler (seen once
                # on an H200 with the 4-bit Mosaic-GPU layout): what did compile is in the cache
                logger.warning("warm-up: compiling on %d threads failed (%s); compiling the rest in order",
                               self.config.warmup_compile_threads, str(e).splitlines()[0] if str(e) else type(e))
                deficit = 0
            else:
                logger.info("warm-up: %d step variants and the sampler compiled on %d threads in %.1f s",
                            len(self._step_jobs()), self.config.warmup_compile_threads,
                            time.perf_counter() - t0)
            if deficit and may_shrink and self.config.cache.num_gpu_blocks_override is None:
                raise _StepWillNotFit(deficit)
        last = self.last
        sc = self.config.scheduler
        blocks = sc.num_scheduler_steps > 1 or sc.async_scheduling
        decode = self.decode_buckets()
        for T in self.token_buckets:
            S = self.seq_bucket(T)
            self._warmup_at = f"token bucket {T} ({S} sequences)"
            logits, hidden = self._forward(self._dummy_inputs(T))
            if self.dense_bucket(T):  # the variant for steps with long prompts that start in them
                self._forward(self._dummy_inputs(T), dense=True)
            for penalties, mode, lp in SAMPLER_VARIANTS:
                st = self._sampling_args(self._dummy_sampling(S, penalties))
                if lp:
                    out = sample(logits, *st, penalties=penalties, num_logprobs=self.max_logprobs, mode=mode)
                else:
                    toks = sample_tokens(logits, *st, penalties=penalties, mode=mode)
            if T in decode and blocks:  # decode blocks: token ids fed on the device
                jax.block_until_ready(self._forward(self._dummy_inputs(T), feed(toks, T)))
            if sc.async_scheduling:  # a step with pending tokens: its ids on the device (fill_tokens)
                ids = self._on_device(np.zeros(T, np.int32), last)  # (host ids go in as numpy: another entry)
                for dense in (False, True)[:1 + self.dense_bucket(T)]:  # and beside a long prompt
                    jax.block_until_ready(self._forward(self._dummy_inputs(T), ids, dense=dense))
            z = np.zeros(PROMPT_LOGPROB_ROWS, np.int32)
            lg = self._logits(self.head_params, hidden, self._put(z, last))
            out2 = token_logprobs(lg, self._put(z, last), num_logprobs=self.max_logprobs)
            if self.config.speculative.enabled:  # the logits and samples of proposed positions
                for R in SPEC_VERIFY_ROWS:
                    lg = self._logits(self.head_params, hidden, self._put(np.zeros(R, np.int32), last))
                    if T == self.token_buckets[0]:
                        st = self._sampling_args(self._dummy_sampling(R, False))
                        for penalties, mode, lp in SAMPLER_VARIANTS:
                            if not penalties and not lp:
                                sample_tokens(lg, *st, penalties=False, mode=mode)
            jax.block_until_ready((out, toks, out2))
        self._warmup_at = "the token feeds and block copies"
        if sc.async_scheduling:  # a block's first tokens from the previous (same or larger) block
            jax.block_until_ready([feed_rows(self._on_device(np.zeros(self.seq_bucket(Tp), np.int32), last),
                                              self._put(np.zeros(T, np.int32), last))
                                   for Tp, T in self._feed_pairs()])
            # a step's pending tokens from the prefill / mixed step before it (_pending_tokens)
            s_max = self.seq_bucket(self.token_buckets[-1])
            for S in sorted({self.seq_bucket(T) for T in self.token_buckets}):
                samples = feed(self._on_device(np.zeros(S, np.int32), last), s_max)
            jax.block_until_ready([fill_tokens(self._put(np.zeros(T, np.int32), last), samples)
                                   for T in self.token_buckets])
        for k in kvc.PAIR_BUCKETS:
            z = np.zeros(k, np.int32)
            self._copy_blocks(z, z)
            if self.num_host_blocks:
                self._scatter_blocks(z, self._fetch_blocks(self._gather_blocks(z)))
        if self.num_host_blocks:
            self._host()  # the swap pool, its pages touched now rather than at the first preemption
        jax.block_until_ready(self.kv_caches)

    def num_compilations(self) -> int:
        fns = [*self._stage_jits, *self._stage_jits_cublas, *self._stage_jits_dense, self._logits, sample,
               sample_tokens, token_logprobs,
               kvc.copy_blocks, kvc.gather_blocks, kvc.scatter_blocks, feed, feed_rows, fill_tokens]
        return sum(f._cache_size() for f in fns)
