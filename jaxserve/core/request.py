"""Request and sequence state, counted in tokens. Pure Python.

A Request is what a user asked for; it owns n Sequences (one per sample). Each Sequence has the
token ids so far (prompt + output), how many of them are in the KV cache (num_computed_tokens),
and its block table.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Optional, Union

from jaxserve.core.sched_output import SamplingState
from jaxserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"  # recompute: back in the waiting queue, blocks freed
    SWAPPED = "swapped"  # swap: blocks on the host, waiting to come back
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(m for m in RequestStatus if m.value in ("stop", "length", "abort", "error"))


@dataclass
class SeqUpdate:
    request_id: str
    index: int  # which of the n samples
    seq_id: str  # id in ScheduledRequest.req_id / ModelRunnerOutput.req_ids
    new_token_ids: list[int]
    finish_reason: Optional[str]  # "stop" | "length" | "abort" | None
    stop_reason: Union[int, str, None]
    num_cached_tokens: int
    request_finished: bool  # all n sequences of the request are finished


_SEED_STRIDE = 1_000_003


class Sequence:
    def __init__(self, request: "Request", index: int):
        self.request = request
        self.index = index
        self.seq_id = request.request_id if request.params.n == 1 else f"{request.request_id}-{index}"
        self.token_ids: list[int] = list(request.prompt_token_ids)
        self._num_prompt = len(request.prompt_token_ids)  # the prompt never changes (hot path reads)
        self.num_computed_tokens = 0
        self.block_ids: list[int] = []
        self.block_hashes: list = []  # hash chain of this sequence's full blocks
        self.num_registered_blocks = 0  # leading blocks of block_ids already offered to the prefix cache
        self.status = RequestStatus.WAITING
        self.num_cached_tokens = 0  # prompt tokens served from the prefix cache (first admission)
        self.num_preemptions = 0
        self.stop_reason: Union[int, str, None] = None
        self.host_blocks: list[int] = []  # swap slots while SWAPPED
        self.stop_check = None  # the scheduler's cached StopCheck for this sequence
        # Speculative decoding (n-gram lookup): the index, built on first use, and the back-off
        # after proposals that found nothing or were rejected (no proposal before that length).
        self.ngram = None
        self.spec_backoff = 0
        self.spec_resume_at = 0
        p = request.params
        self.seed = (request.seed + index * _SEED_STRIDE) & 0x7FFFFFFF
        self.sampling = SamplingState(
            temperature=p.temperature, top_k=p.top_k, top_p=p.top_p, min_p=p.min_p,
            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty, seed=self.seed, num_output_tokens=0,
            logprobs=p.logprobs if p.logprobs is not None else -1,
            prompt_logprobs=p.prompt_logprobs if p.prompt_logprobs is not None else -1,
            logit_bias=dict(p.logit_bias) if p.logit_bias else None)

    @property
    def num_prompt_tokens(self) -> int:
        return self._num_prompt

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self._num_prompt:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self._num_prompt

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    def refresh_sampling(self) -> SamplingState:
        """Per-step fields of the SamplingState (the rest never changes)."""
        p = self.request.params
        st = self.sampling
        n_out = self.num_output_tokens
        st.num_output_tokens = n_out
        if n_out < p.min_tokens:
            banned = set(p.stop_token_ids)
            if not p.ignore_eos:
                banned |= set(self.request.eos_token_ids)
            st.banned_token_ids = sorted(banned)
        else:
            st.banned_token_ids = None
        if p.needs_penalties:
            st.prompt_token_ids = self.request.prompt_token_ids
            st.output_token_ids = self.output_token_ids
        return st


class Request:
    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_ids, arrival_time: float, seed: int, priority: int = 0,
                 prediction_token_ids: Optional[list[int]] = None):
        self.request_id = request_id
        self.prediction_token_ids = prediction_token_ids  # the expected output (speculation's source)
        self.prompt_token_ids = list(prompt_token_ids)
        self.params = sampling_params
        self.eos_token_ids = frozenset(eos_token_ids)
        self.arrival_time = arrival_time
        self.seed = seed
        self.priority = priority
        self.seqs = [Sequence(self, i) for i in range(sampling_params.n)]

    @property
    def finished(self) -> bool:
        return all(s.status.finished for s in self.seqs)
