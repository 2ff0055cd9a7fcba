"""The one contract between the scheduler (core/) and the model runner (runner/).

The scheduler decides *what* runs this step; the runner turns it into device arrays. Both sides
count in tokens. Nothing here imports jax.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import numpy as np


PENDING_TOKEN = -1  # a token id not known yet when the step was scheduled (async scheduling)


@dataclass
class ScheduledRequest:
    """One sequence's share of a step."""

    req_id: str  # the scheduler's id for this sequence (n>1 children have their own ids)
    # Tokens this step computes: all_token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens].
    token_ids: list[int]
    num_computed_tokens: int  # tokens already in the KV cache before this step
    # Full block table of the sequence after this step's allocation (block ids, null block never
    # included); the runner takes the first ceil((num_computed + num_new) / block_size) of them.
    block_ids: list[int]
    # True when this step reaches the end of the known tokens, so a new token is sampled.
    sample: bool
    sampling: "SamplingState"
    # Speculative decoding: proposed tokens, computed after token_ids[0] (the sequence's last
    # token) in this step; token_ids is [last token] + spec_token_ids. The runner checks them
    # against the model's own samples (ModelRunnerOutput.spec_token_ids).
    spec_token_ids: Optional[list[int]] = None


@dataclass
class SamplingState:
    """What the on-device sampler needs for one sequence (built by the scheduler, read by the runner)."""

    temperature: float
    top_k: int  # 0 = off
    top_p: float
    min_p: float
    presence_penalty: float
    frequency_penalty: float
    repetition_penalty: float
    # PRNG: the key of step i is fold_in(PRNGKey(seed), num_output_tokens) so that the same
    # seed gives the same tokens whatever the batch.
    seed: int
    num_output_tokens: int  # tokens generated so far (the fold-in counter)
    logprobs: int  # top-k logprobs to return for the sampled token (0 = none, -1 = not even the sampled one)
    prompt_logprobs: int  # -1 = none
    # Token ids seen in the prompt / generated so far, for the penalties (empty when no penalty).
    prompt_token_ids: Optional[list[int]] = None
    output_token_ids: Optional[list[int]] = None
    # Tokens that must not be sampled yet (EOS and stop ids while below min_tokens).
    banned_token_ids: Optional[list[int]] = None
    logit_bias: Optional[dict[int, float]] = None

    def clone(self) -> "SamplingState":
        """A shallow copy (the scheduler's hot path: ~3x cheaper than copy.copy)."""
        c = object.__new__(SamplingState)
        c.__dict__.update(self.__dict__)
        return c


@dataclass
class SchedulerOutput:
    """Everything the runner needs for one step, in execution order (sequences are packed in this order)."""

    scheduled: list[ScheduledRequest]
    total_num_tokens: int  # sum of len(s.token_ids)
    # Swap-mode preemption: copy these device blocks to host slots (before the step) and these
    # host slots back to device blocks (before the step). Pairs of (src, dst).
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    # Copy-on-write: copy device block src -> dst before the step.
    copy_blocks: list[tuple[int, int]] = field(default_factory=list)
    # Sequences that finished or were aborted since the last step (the runner drops their state).
    finished_req_ids: list[str] = field(default_factory=list)
    # A decode block: every scheduled sequence is a one-token decode that needs no per-token host
    # decision, and the runner runs num_steps decode steps, feeding each step's sampled token into
    # the next on the device (blocks for num_steps new tokens are already allocated).
    decode_block: bool = False
    num_steps: int = 1
    # Async scheduling: this block was scheduled while the previous decode block was still on the
    # device. Its sequences' first tokens are not known on the host (token_ids holds a placeholder):
    # sequence i takes the previous block's last sampled token of row feed_rows[i].
    feed_rows: Optional[list[int]] = None
    # Async scheduling after a prefill / mixed step: rows whose one token is PENDING_TOKEN, the
    # token the previous step samples for that sequence; the engine writes it into the staged
    # inputs once the previous step's tokens are back, before this step is dispatched.
    pending_token_rows: Optional[list[int]] = None

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


@dataclass
class ModelRunnerOutput:
    """What comes back from the device after one step, for the sequences that sampled."""

    req_ids: list[str]  # sequences with sample=True, in scheduled order
    sampled_token_ids: np.ndarray  # [num_sampled] int32; [num_sampled, num_steps] for a multi-step
    # The sampled token's logprob, [num_sampled] float32 (None when no request asked for logprobs).
    sampled_logprobs: Optional[np.ndarray] = None
    # Top-k alternatives: [num_sampled, k] ids and logprobs (k = max requested this step), None if none.
    top_token_ids: Optional[np.ndarray] = None
    top_logprobs: Optional[np.ndarray] = None
    # Rank of the sampled token (1 = most likely), [num_sampled] int32.
    sampled_ranks: Optional[np.ndarray] = None
    # Prompt logprobs by req_id: (first_position, token_logprobs [n], top_ids [n, k],
    # top_logprobs [n, k], ranks [n]) for the n prompt positions computed this step, starting at
    # first_position; position p holds the logprob of prompt[p + 1].
    prompt_logprobs: dict[str, tuple] = field(default_factory=dict)
    # Rows with proposed tokens: the tokens the row emits, by req_id: the model's samples at the
    # row's positions up to and including the first that differs from the proposal (all of them,
    # k + 1, when every proposed token matched).
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
