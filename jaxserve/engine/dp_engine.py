"""Data parallelism: N engine replicas (each its own scheduler, KV cache and tp x pp devices)
behind one front end with the LLMEngine interface.

A new request goes to the least-loaded replica (fewest unfinished requests, then fewest queued
prompt tokens). step() steps every replica that has work on its own thread, so the replicas'
devices run at the same time (JAX releases the GIL while a step runs and while waiting for it).
"""
from __future__ import annotations

import dataclasses
import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from jaxserve.config import EngineConfig
from jaxserve.engine.llm_engine import EngineStats, LLMEngine
from jaxserve.outputs import RequestOutput
from jaxserve.parallel.mesh import ParallelismError

logger = logging.getLogger("jaxserve")


def make_engine(config: EngineConfig):
    """An LLMEngine, or a DataParallelEngine when data_parallel_size > 1."""
    if config.parallel.data_parallel_size > 1:
        return DataParallelEngine(config)
    return LLMEngine(config)


class DataParallelEngine:
    def __init__(self, config: EngineConfig):
        import jax

        pc = config.parallel
        if pc.num_processes > 1:
            raise ParallelismError("data_parallel_size > 1 with several processes is not supported: run one "
                                   "server per host (each its own replica) behind a load balancer instead")
        per = pc.tensor_parallel_size * pc.pipeline_parallel_size
        devices = jax.devices()
        if len(devices) < per * pc.data_parallel_size:
            raise ParallelismError(
                f"data_parallel_size={pc.data_parallel_size} x tensor_parallel_size={pc.tensor_parallel_size} "
                f"x pipeline_parallel_size={pc.pipeline_parallel_size} needs {per * pc.data_parallel_size} "
                f"devices, {len(devices)} visible ({devices[0].platform}); on CPU set "
                f"XLA_FLAGS=--xla_force_host_platform_device_count={per * pc.data_parallel_size}")
        self.config = config
        self.replicas: list[LLMEngine] = []
        for r in range(pc.data_parallel_size):
            logger.info("data-parallel replica %d/%d on %s", r + 1, pc.data_parallel_size,
                        [str(d) for d in devices[r * per:(r + 1) * per]])
            self.replicas.append(LLMEngine(config, devices=devices[r * per:(r + 1) * per]))
        first = self.replicas[0]
        self.model, self.tokenizer, self.model_name = first.model, first.tokenizer, first.model_name
        self.max_model_len, self.eos_token_ids = first.max_model_len, first.eos_token_ids
        self._owner: dict[str, int] = {}
        self._load = [0] * len(self.replicas)  # queued prompt tokens per replica (routing tie-break)
        self._pool = ThreadPoolExecutor(len(self.replicas), thread_name_prefix="jaxserve-dp")

    @classmethod
    def from_engine_args(cls, engine_args=None, **kwargs) -> "DataParallelEngine":
        from jaxserve.config import engine_config_from_kwargs
        from jaxserve.engine.engine_args_api import engine_kwargs

        return cls(engine_config_from_kwargs(**engine_kwargs(engine_args, **kwargs)))

    # ---- the LLMEngine interface ------------------------------------------------------------
    def apply_chat_template(self, *args, **kwargs) -> list[int]:
        return self.replicas[0].apply_chat_template(*args, **kwargs)

    def pick_replica(self) -> int:
        """Least loaded: fewest unfinished requests, then fewest prompt tokens routed and unfinished."""
        counts = [e.num_unfinished_requests() for e in self.replicas]
        return min(range(len(self.replicas)), key=lambda r: (counts[r], self._load[r], r))

    def add_request(self, request_id: str, prompt, params, **kw) -> None:
        if request_id in self._owner:
            raise ValueError(f"request id {request_id!r} is already in use")
        r = self.pick_replica()
        ids = self.replicas[r].add_request(request_id, prompt, params, **kw)
        self._owner[request_id] = r
        self._load[r] += len(ids)

    def abort_request(self, request_ids) -> None:
        ids = [request_ids] if isinstance(request_ids, str) else list(request_ids)
        for rid in ids:
            r = self._owner.get(rid)
            if r is not None:
                self.replicas[r].abort_request(rid)

    def has_unfinished_requests(self) -> bool:
        return any(e.has_unfinished_requests() for e in self.replicas)

    def reset_prefix_cache(self) -> bool:
        return all([e.reset_prefix_cache() for e in self.replicas])

    def step(self) -> list[RequestOutput]:
        busy = [e for e in self.replicas if e.has_unfinished_requests()]
        if len(busy) <= 1:
            results = [e.step() for e in busy]
        else:
            results = list(self._pool.map(lambda e: e.step(), busy))
        outputs = [o for res in results for o in res]
        for o in outputs:
            if o.finished:
                r = self._owner.pop(o.request_id, None)
                if r is not None:
                    self._load[r] -= len(o.prompt_token_ids)
        return outputs

    def get_stats(self) -> EngineStats:
        stats = [e.get_stats() for e in self.replicas]
        total = {f.name: sum(getattr(s, f.name) for s in stats) for f in dataclasses.fields(EngineStats)}
        total["kv_cache_usage"] = sum(s.kv_cache_usage for s in stats) / len(stats)
        total["num_steps"] = max(s.num_steps for s in stats)
        return EngineStats(**total)

    def replica_stats(self) -> list[EngineStats]:
        return [e.get_stats() for e in self.replicas]

    @property
    def trace(self) -> Optional[list]:
        return self.replicas[0].trace

    @trace.setter
    def trace(self, value) -> None:
        """The trace records replica 0's steps (each replica has its own scheduler)."""
        self.replicas[0].trace = value

    @property
    def runner(self):
        return self.replicas[0].runner

    @property
    def scheduler(self):
        return self.replicas[0].scheduler
