"""AsyncLLM: the engine loop in one background thread, each request with its own asyncio.Queue.

Only the engine thread touches LLMEngine. Requests and aborts reach it through a queue; it sleeps
on a condition variable when there is nothing to do (no polling). Outputs go back with
loop.call_soon_threadsafe. The model loads in that thread too, so a server answers /health while
it loads and /ready once it has warmed up.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Optional

from jaxserve.engine.gc_policy import quiet_gc
from jaxserve.outputs import RequestOutput
from jaxserve.sampling_params import SamplingParams

logger = logging.getLogger("jaxserve")


class EngineDeadError(RuntimeError):
    pass


class OverloadedError(RuntimeError):
    """The waiting queue is full: the server answers 503 with Retry-After."""


@dataclass
class _Add:
    request_id: str
    prompt: object
    params: SamplingParams
    prompt_token_ids: Optional[list]
    priority: int
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncLLM:
    def __init__(self, engine_kwargs: dict, *, max_waiting_requests: Optional[int] = None, engine=None):
        self._kwargs = engine_kwargs
        self.max_waiting_requests = max_waiting_requests
        self.engine = engine  # set by the thread once loaded (or given, for tests)
        self.load_error: Optional[BaseException] = None
        self._ready = threading.Event()
        self._cv = threading.Condition()
        self._inbox: collections.deque = collections.deque()
        self._queues: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = False
        self._draining = False
        self.stats = None  # EngineStats snapshot, refreshed by the engine thread
        self._pending_adds = 0
        self._thread = threading.Thread(target=self._run, name="jaxserve-engine", daemon=True)
        self._thread.start()

    # ---- state ------------------------------------------------------------------------------
    @property
    def is_ready(self) -> bool:
        return self._ready.is_set() and self.engine is not None and not self._draining

    @property
    def is_alive(self) -> bool:
        return self._thread.is_alive() and self.load_error is None

    @property
    def num_in_flight(self) -> int:
        return len(self._queues)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        self._ready.wait(timeout)
        if self.load_error is not None:
            raise self.load_error
        return self.engine is not None

    def start_draining(self) -> None:
        """Graceful shutdown: stop admitting; in-flight requests finish."""
        self._draining = True

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(timeout=10)

    # ---- the engine thread ------------------------------------------------------------------
    def _run(self) -> None:
        if self.engine is None:
            try:
                from jaxserve.config import engine_config_from_kwargs
                from jaxserve.engine.dp_engine import make_engine

                self.engine = make_engine(engine_config_from_kwargs(**self._kwargs))
            except BaseException as e:  # reported by /health and to every caller
                logger.error("engine failed to start: %s", e)
                self.load_error = e
                self._ready.set()
                return
        self.stats = self.engine.get_stats()
        self._ready.set()
        with quiet_gc():  # (gc_policy.py) for the engine thread's lifetime
            self._loop()
        self._fail_all(EngineDeadError("the engine is shutting down"))

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not self.engine.has_unfinished_requests():
                    self._cv.wait()
                if self._stop:
                    break
                items = list(self._inbox)
                self._inbox.clear()
            for it in items:
                self._handle(it)
            if self.engine.has_unfinished_requests():
                try:
                    outs = self.engine.step()
                except Exception as e:  # never hang clients: fail what is in flight, keep serving
                    logger.exception("engine step failed")
                    self._fail_all(e)
                    outs = []
                for o in outs:
                    self._deliver(o.request_id, o, final=o.finished)
            self.stats = self.engine.get_stats()

    def _handle(self, it) -> None:
        if isinstance(it, _Add):
            self._pending_adds -= 1
            self._queues[it.request_id] = (it.loop, it.queue)
            try:
                self.engine.add_request(it.request_id, it.prompt, it.params, prompt_token_ids=it.prompt_token_ids,
                                        priority=it.priority)
            except Exception as e:
                self._deliver(it.request_id, e if isinstance(e, ValueError) else ValueError(str(e)), final=True)
        else:  # abort
            rid = it[1]
            self._queues.pop(rid, None)
            self.engine.abort_request(rid)
            # the abort output (if any) is dropped: nobody listens any more

    def _deliver(self, rid: str, item, final: bool) -> None:
        dest = self._queues.get(rid)
        if dest is None:
            return
        loop, q = dest
        if final:
            self._queues.pop(rid, None)
        try:
            loop.call_soon_threadsafe(q.put_nowait, item)
        except RuntimeError:  # the caller's loop is closed
            pass

    def _fail_all(self, err: BaseException) -> None:
        for rid in list(self._queues):
            try:
                self.engine.abort_request(rid)
            except Exception:
                pass
            self._deliver(rid, err, final=True)

    # ---- the caller's side ------------------------------------------------------------------
    async def generate(self, prompt, params: SamplingParams, request_id: str, *,
                       prompt_token_ids: Optional[list[int]] = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        if self.load_error is not None:
            raise EngineDeadError(f"the engine failed to start: {self.load_error}")
        if not self.is_ready:
            raise OverloadedError("the server is not ready (loading, warming up or shutting down)")
        if self.max_waiting_requests is not None:
            waiting = (self.stats.num_waiting if self.stats else 0) + self._pending_adds
            if waiting >= self.max_waiting_requests:
                raise OverloadedError(f"{waiting} requests are waiting (max_waiting_requests="
                                      f"{self.max_waiting_requests})")
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        with self._cv:
            self._pending_adds += 1
            self._inbox.append(_Add(request_id, prompt, params, prompt_token_ids, priority, loop, q))
            self._cv.notify()
        finished = False
        try:
            while True:
                item = await q.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        with self._cv:
            self._inbox.append(("abort", request_id))
            self._cv.notify()
