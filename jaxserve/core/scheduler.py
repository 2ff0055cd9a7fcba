"""Continuous batching over one unified ragged batch.

Every step: running sequences first (a decode takes 1 token, an unfinished prefill a chunk),
then swapped-out sequences come back, then waiting ones are admitted in policy order, all within
the token budget (max_num_batched_tokens) and max_num_seqs. When blocks run out, the
lowest-ranked running sequence is preempted (recompute: free and re-queue; swap: copy its blocks
to host slots). Pure Python; see docs/ARCHITECTURE.md for the block states and the step.
"""
from __future__ import annotations

from collections import deque
from typing import NamedTuple, Optional

import numpy as np

from jaxserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from jaxserve.core.kv_cache_manager import KVCacheManager
from jaxserve.core.ngram import NgramIndex
from jaxserve.core.request import Request, RequestStatus, Sequence, SeqUpdate
from jaxserve.core.sched_output import PENDING_TOKEN, ModelRunnerOutput, ScheduledRequest, SchedulerOutput


class StopCheck(NamedTuple):
    """What the hot paths need of a sequence's parameters, computed once per sequence."""

    ids: frozenset  # token ids that can stop it (stop_token_ids, EOS unless ignore_eos)
    limit: int  # the length it ends at (prompt + max_tokens, max_model_len)
    min_len: int  # below this length stop ids do not count (prompt + min_tokens)
    kind: int  # 0: a host decision every token (penalties, logprobs); 1: stop strings; 2: free


# Speculative decoding: a sequence whose lookup found nothing (or whose proposal's first token
# was rejected) stops proposing for 1, 2, 4, ... up to this many tokens; meanwhile its steps may
# run ahead of the host (async scheduling), which a step with proposals cannot.
SPEC_MAX_BACKOFF = 32


class Scheduler:
    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig, *,
                 num_device_blocks: int, num_host_blocks: int, block_size: int, max_model_len: int,
                 speculative: Optional[SpeculativeConfig] = None, max_spec_rows: int = 256):
        if (num_device_blocks - 1) * block_size < max_model_len:
            # Otherwise a lone sequence could outgrow the cache and preempt itself forever.
            raise ValueError(f"the KV cache ({num_device_blocks - 1} blocks x {block_size}) must hold one "
                             f"sequence of max_model_len={max_model_len}")
        self.cfg = scheduler_config
        self.block_size = block_size
        self.max_model_len = max_model_len
        self.kv = KVCacheManager(num_device_blocks, block_size, cache_config.enable_prefix_caching)
        self.priority = scheduler_config.scheduling_policy == "priority"
        self.swap_mode = scheduler_config.preemption_mode == "swap" and num_host_blocks > 0
        self.host_free: list[int] = list(range(num_host_blocks - 1, -1, -1))  # pop() gives slot 0 first
        self._host_release: list[int] = []  # host slots freed this step, reusable next step
        self.requests: dict[str, Request] = {}
        self.seqs: dict[str, Sequence] = {}
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.swapped: deque[Sequence] = deque()
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.num_async_blocks = 0  # steps scheduled before the previous one's tokens were back
        self.num_async_mixed = 0  # of which after a prefill / mixed step (schedule_next_step)
        self._step_preempted: list[str] = []
        self._step_hits = 0
        self._step_swaps = (0, 0)
        # Speculative decoding: max_spec_rows positions per step can be checked (the runner's
        # verification rows); each sequence with k proposed tokens takes k + 1 of them.
        self.spec = speculative if speculative is not None and speculative.enabled else None
        self.max_spec_rows = max_spec_rows
        # speculate while at most this many sequences run (by default: as many as one step can
        # check a full proposal for)
        self.spec_batch_limit = 0 if self.spec is None else (
            self.spec.speculative_disable_by_batch_size or max_spec_rows // (self.spec.num_speculative_tokens + 1))
        self.num_spec_drafts = 0  # sequence-steps that carried proposed tokens
        self.num_spec_draft_tokens = 0
        self.num_spec_accepted_tokens = 0

    # ---- admission --------------------------------------------------------------------------
    def add_request(self, req: Request) -> None:
        n = len(req.prompt_token_ids)
        if req.request_id in self.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        if n >= self.max_model_len:
            raise ValueError(f"the prompt has {n} tokens but max_model_len is {self.max_model_len}")
        need = -(-(n + 1) // self.block_size)
        if need > self.kv.pool.num_usable:
            raise ValueError(f"the prompt needs {need} KV blocks but the whole cache has "
                             f"{self.kv.pool.num_usable}; give the cache more memory or shorten the prompt")
        if not self.cfg.enable_chunked_prefill and n > self.cfg.max_num_batched_tokens:
            raise ValueError(f"the prompt has {n} tokens, more than max_num_batched_tokens="
                             f"{self.cfg.max_num_batched_tokens}, and chunked prefill is off")
        self.requests[req.request_id] = req
        for s in req.seqs:
            self.seqs[s.seq_id] = s
            self._enqueue(s)

    def _rank(self, s: Sequence):
        """Smaller = served first (and preempted last)."""
        r = s.request
        return (r.priority, r.arrival_time, r.request_id, s.index) if self.priority else \
            (r.arrival_time, r.request_id, s.index)

    def _enqueue(self, s: Sequence, front: bool = False) -> None:
        if self.priority:
            self.waiting.append(s)
            self.waiting = deque(sorted(self.waiting, key=self._rank))
        elif front:
            self.waiting.appendleft(s)
        else:
            self.waiting.append(s)

    # ---- the step ---------------------------------------------------------------------------
    def schedule(self, max_block_steps: Optional[int] = None) -> SchedulerOutput:
        """The next step. max_block_steps: a decode block is at most this many steps long."""
        # highest first, so pop() hands them out ascending: a sequence swapped out next gets a
        # consecutive run of slots where one is free, which swap-in reads as one view, no copy
        self.host_free.extend(sorted(self._host_release, reverse=True))
        self._host_release = []
        budget = self.cfg.max_num_batched_tokens
        scheduled: list[tuple[Sequence, int]] = []
        swap_out: list[tuple[int, int]] = []
        swap_in: list[tuple[int, int]] = []
        self._step_preempted = []
        self._step_hits = 0
        done: set[str] = set()
        preempted = False
        multi = self._schedule_multistep(max_block_steps)
        if multi is not None:
            return multi

        if self.priority:  # waiting work that outranks running work goes first, preempting if needed
            budget, preempted = self._admit(budget, preempted, scheduled, done, swap_out, outranking_only=True)
        self.running.sort(key=self._rank)
        i = 0
        while i < len(self.running) and self.running[i].seq_id in done:
            i += 1
        drafts: dict[str, list[int]] = {}
        spec_rows = self.max_spec_rows if self.spec is not None and self._spec_batch_ok(len(self.running)) else 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = self._chunk(seq, budget)
            if spec_rows > 1 and num_new == 1 and seq.num_computed_tokens == seq.num_tokens - 1:
                d = self._propose(seq, min(budget, spec_rows) - 1)
                if d and self.kv.allocate(seq, 1 + len(d)):  # (no preemption for a proposal)
                    drafts[seq.seq_id] = d
                    spec_rows -= 1 + len(d)
                    scheduled.append((seq, 1 + len(d)))
                    done.add(seq.seq_id)
                    budget -= 1 + len(d)
                    i += 1
                    continue
            while not self.kv.allocate(seq, num_new):
                victim = self._pick_victim(exclude=done | {seq.seq_id})
                preempted = True
                if victim is None:  # nothing else to take from: this one yields
                    self._preempt(seq, swap_out)
                    break
                self._preempt(victim, swap_out)
            else:
                scheduled.append((seq, num_new))
                done.add(seq.seq_id)
                budget -= num_new
                i += 1
                continue
            # seq itself was preempted: it left self.running, index i now points at the next one

        # Swapped sequences come back before new work is admitted.
        while self.swapped and not preempted and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.swapped[0]
            if len(seq.host_blocks) > self.kv.pool.num_free:
                break
            self.swapped.popleft()
            dev = self.kv.pool.allocate(len(seq.host_blocks))
            swap_in.extend(zip(seq.host_blocks, dev))
            self._host_release.extend(seq.host_blocks)
            seq.host_blocks = []
            seq.block_ids = dev
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            num_new = self._chunk(seq, budget)
            if not self.kv.allocate(seq, num_new):
                continue  # holds its blocks; computes next step
            scheduled.append((seq, num_new))
            done.add(seq.seq_id)
            budget -= num_new

        # Admit waiting sequences.
        budget, preempted = self._admit(budget, preempted, scheduled, done, swap_out, outranking_only=False)
        out = SchedulerOutput(
            scheduled=[self._scheduled_request(s, n, drafts.get(s.seq_id)) for s, n in scheduled],
            total_num_tokens=sum(n for _, n in scheduled),
            swap_out=swap_out, swap_in=swap_in, finished_req_ids=self._finished_ids)
        self._finished_ids = []
        self._step_swaps = (len(swap_out), len(swap_in))
        return out

    def _schedule_multistep(self, max_steps: Optional[int] = None) -> Optional[SchedulerOutput]:
        """A decode block of K = num_scheduler_steps steps (K = 1 with async scheduling: a
        decode-only step whose successor can be dispatched before its tokens are back), when
        nothing else could run (nothing swapped out; nothing waiting, or the batch is full so
        waiting work could not be admitted anyway), all running sequences are one-token decodes
        that need no per-token host decision. The block is as long as the free blocks allow
        (up to K) and one step long when a sequence has stop strings."""
        K = self.cfg.num_scheduler_steps
        if (K <= 1 and not self.cfg.async_scheduling) or self.swapped or not self.running:
            return None
        if self._admission_possible(len(self.running),
                                    lambda: -sum(self.kv.blocks_needed(seq, 1) for seq in self.running)):
            return None
        if len(self.running) > min(self.cfg.max_num_seqs, self.cfg.max_num_batched_tokens):
            return None
        if self._any_spec_ready(self.running):
            return None  # the host's schedule proposes tokens for them
        cap = K if max_steps is None else min(K, max_steps)
        for seq in self.running:
            if seq.num_computed_tokens != seq.num_tokens - 1:
                return None
            cap = min(cap, self._block_cap(seq, K, 0))
            if cap == 0:
                return None
        K = self._block_len(self.running, cap, 0)
        if K == 0:
            return None
        self.running.sort(key=self._rank)
        for seq in self.running:
            ok = self.kv.allocate(seq, K)
            assert ok, seq.seq_id
        return self._block_output([self._scheduled_request(s, 1) for s in self.running], K, None)

    def schedule_next_block(self, prev: SchedulerOutput) -> Optional[SchedulerOutput]:
        """Async scheduling: the decode block after `prev`, built while `prev` is still on the
        device (its tokens not yet applied), or None when the next step needs the host's full
        view (admission, preemption, swaps). Sequences that `prev` finishes by length are left
        out; the runner feeds each remaining sequence's first token from prev's last samples."""
        if not (self.cfg.async_scheduling and prev.decode_block) or self.swapped:
            return None
        K, P = self.cfg.num_scheduler_steps, prev.num_steps
        rows, seqs, freed, cap = [], [], 0, K
        for r, sr in enumerate(prev.scheduled):
            seq = self.seqs.get(sr.req_id)
            if seq is None or seq.status != RequestStatus.RUNNING:
                continue  # finished or aborted since prev was scheduled
            assert seq.num_computed_tokens == sr.num_computed_tokens, sr.req_id  # prev not applied yet
            if len(seq.token_ids) + P >= self._stop_check(seq).limit:  # max_tokens / model len
                freed += sum(1 for b in seq.block_ids if self.kv.pool.ref_cnt[b] == 1)
                continue  # prev's last token is its last: its blocks come free when prev is applied
            cap = min(cap, self._block_cap(seq, K, P))
            if cap == 0:
                return None
            rows.append(r)
            seqs.append(seq)
        if self._any_spec_ready(seqs, P):
            return None  # the step after prev proposes tokens: it needs prev's tokens on the host
        # The host's next schedule (prev applied) would give every continuing sequence one token
        # before admitting: those blocks are spoken for, the finishers' blocks free.
        if not seqs or self._admission_possible(
                len(seqs), lambda: freed - sum(self.kv.blocks_needed(seq, P + 1) for seq in seqs), seqs, P):
            return None
        K = self._block_len(seqs, cap, P)
        if K == 0:
            return None
        scheduled = []
        for seq in seqs:
            ok = self.kv.allocate(seq, P + K)
            assert ok, seq.seq_id
            # A block's sequences have no penalties and no min_tokens bans left (_block_cap).
            st = seq.sampling.clone()
            st.num_output_tokens, st.banned_token_ids = seq.num_output_tokens + P, None
            scheduled.append(ScheduledRequest(
                req_id=seq.seq_id, token_ids=[0], num_computed_tokens=seq.num_computed_tokens + P,
                block_ids=list(seq.block_ids), sample=True, sampling=st))
        return self._block_output(scheduled, K, rows)

    def schedule_next_step(self, prev: SchedulerOutput) -> Optional[SchedulerOutput]:
        """Async scheduling of the step after a prefill / mixed step `prev`, while prev is still
        on the device: the host's usual schedule, made on the state prev will leave (its chunks
        computed, a PENDING_TOKEN for each token it samples), then that projection undone so
        prev's results apply as usual (a decode block when every row is a plain decode, whose
        successors then chain on the device). A sequence whose pending token is its last (max_tokens,
        max_model_len) sits this step out; one that stops on EOS or a stop string computes one
        row more (discarded). The engine writes the pending tokens into the staged inputs once
        prev's tokens are back (`pending_token_rows`). None when the next step needs the host's
        full view: preemption, swaps, the priority policy, or a sequence that needs a host
        decision every token (penalties, logprobs)."""
        if not self.cfg.async_scheduling or prev.decode_block or self.swapped or self.priority \
                or prev.swap_in or prev.swap_out or prev.copy_blocks or self._step_preempted:
            return None
        live, first_token = [], False
        for sr in prev.scheduled:
            seq = self.seqs.get(sr.req_id)
            if seq is None or seq.status != RequestStatus.RUNNING:
                continue  # finished or aborted since prev was scheduled
            if self._stop_check(seq).kind == 0:
                return None
            assert seq.num_computed_tokens == sr.num_computed_tokens, sr.req_id  # prev not applied yet
            live.append((seq, sr))
            first_token |= sr.sample and seq.num_output_tokens == 0
        if any(self._stop_check(s).kind == 0 for s in self.running):
            return None  # a running sequence prev did not carry needs host decisions
        if self._any_spec_ready(self.running, 1):
            return None  # proposals need prev's tokens on the host
        projected, ending = [], []
        for seq, sr in live:
            seq.num_computed_tokens += len(sr.token_ids)
            if sr.sample:
                seq.token_ids.append(PENDING_TOKEN)
                if len(seq.token_ids) >= seq.stop_check.limit:
                    ending.append(seq)
            projected.append((seq, len(sr.token_ids), sr.sample))
        for seq in ending:
            self.running.remove(seq)
        try:
            # No preemption on a projection: every running sequence's next chunk must fit.
            budget = self.cfg.max_num_batched_tokens
            need = sum(self.kv.blocks_needed(seq, min(seq.num_tokens - seq.num_computed_tokens, budget))
                       for seq in self.running)
            if need > self.kv.pool.num_free:
                return None
            # A decode block when every row is a plain decode; one step long when prev samples a
            # sequence's first token: the engine dispatches it before taking prev's tokens, and
            # the host's dispatch of K steps (~2.6 ms each for an 8B model) would hold the first
            # token back by that much (time to first token) where one step's overlaps prev.
            out = self.schedule(max_block_steps=1 if first_token else None)
        finally:
            self._undo_projection(projected, ending)
        assert not out.swap_out and not self._step_preempted
        if out.is_empty:
            return None
        rows = []
        for i, sr in enumerate(out.scheduled):
            if sr.token_ids and sr.token_ids[-1] == PENDING_TOKEN:
                assert len(sr.token_ids) == 1, sr.req_id
                sr.sampling = sr.sampling.clone()  # the sequence's state object moves on when prev applies
                rows.append(i)
        out.pending_token_rows = rows
        self.num_async_blocks += 1
        self.num_async_mixed += 1
        return out

    def _undo_projection(self, projected: list, ending: list) -> None:
        for seq, n, sampled in projected:
            seq.num_computed_tokens -= n
            if sampled:
                seq.token_ids.pop()
        self.running.extend(ending)

    def _admission_possible(self, num_running: int, spare=lambda: 0, growing=None, ahead: int = 0) -> bool:
        """The host's next full schedule could admit waiting work (or let it outrank running work),
        with num_running sequences decoding one token each and spare() blocks on top of the free
        ones (negative: taken by those decodes; computed only when the block check is reached).
        Mirrors _admit's checks for the head of the queue, so a decode block never delays an
        admission the full schedule would make (a sequence that stops on EOS inside a dispatched
        block frees its blocks one block later).
        Without the block check, a batch shrunk by preemption (waiting work that cannot fit)
        would run every step synchronously. growing / ahead: the sequences that keep running
        (default: all running) and their tokens still pending, for the admission headroom."""
        if not self.waiting:
            return False
        if self.priority:
            return True
        if num_running >= self.cfg.max_num_seqs:
            return False
        seq = self.waiting[0]
        if not self._sibling_ready(seq):
            return True  # _admit skips it and tries the next: stay conservative
        budget = self.cfg.max_num_batched_tokens - num_running
        if budget <= 0:
            return False
        computed = self.kv.get_computed_blocks(seq) if seq.num_computed_tokens == 0 else []
        remaining = seq.num_tokens - seq.num_computed_tokens - len(computed) * self.block_size
        if not self.cfg.enable_chunked_prefill and remaining > budget:
            return False
        num_new = min(remaining, budget, self._threshold())
        if self.cfg.admission_headroom_tokens > 0 and num_running:
            held = self._blocks(seq.num_computed_tokens + len(computed) * self.block_size + num_new)
            extra = self._headroom_blocks(self.running if growing is None else growing, ahead) \
                + max(0, self._headroom_target(seq) - held)
            return self.kv.can_allocate(seq, num_new, computed, spare=spare() - extra)
        return self.kv.can_allocate(seq, num_new, computed, spare=spare())

    def _headroom_target(self, seq: Sequence, ahead: int = 0) -> int:
        """Blocks seq should be able to reach: its tokens (after `ahead` pending ones) plus the
        admission headroom, capped by its length limit."""
        n = min(self._stop_check(seq).limit, len(seq.token_ids) + ahead + self.cfg.admission_headroom_tokens)
        return self._blocks(n)

    def _blocks(self, num_tokens: int) -> int:
        """Blocks that hold num_tokens tokens."""
        return -(-num_tokens // self.block_size)

    def _headroom_blocks(self, seqs, ahead: int = 0) -> int:
        """Blocks the growth of `seqs` holds back from admission: each one's headroom target
        beyond the blocks it holds, or will hold once its next token (after `ahead` pending ones)
        is allocated (the decode blocks a caller of _admission_possible counts in its spare)."""
        total = 0
        for seq in seqs:
            held = max(len(seq.block_ids), self._blocks(seq.num_computed_tokens + ahead + 1))
            need = self._headroom_target(seq, ahead) - held
            if need > 0:
                total += need
        return total

    def _block_cap(self, seq: Sequence, K: int, pending: int) -> int:
        """How many decode steps (<= K) seq can take in one block after `pending` unapplied
        tokens without a host decision per token; 0 when it needs one every token (penalties,
        logprobs, min_tokens bans). Stop strings allow one-step blocks (the engine finishes the
        sequence after the step; a longer block would run past it); the context ends at
        max_model_len."""
        _, _, min_len, kind = self._stop_check(seq)
        n = len(seq.token_ids)
        if kind == 0 or n + pending < min_len:
            return 0
        return max(0, min(1 if kind == 1 else K, self.max_model_len - n - pending))

    def _block_len(self, seqs: list, cap: int, pending: int, spare: int = 0) -> int:
        """The longest block (<= cap steps) whose new tokens' blocks fit in the free ones (plus
        spare): near a full cache a shorter block still runs ahead of the host where a
        K-step one would fall back to a synchronous step."""
        free = self.kv.pool.num_free + spare

        def fits(k):
            return sum(self.kv.blocks_needed(seq, pending + k) for seq in seqs) <= free
        if fits(cap):
            return cap
        lo, hi = 0, cap  # fits(lo) (pending's blocks are allocated), not fits(hi)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if fits(mid) else (lo, mid)
        return lo

    def _block_output(self, scheduled: list[ScheduledRequest], K: int, rows) -> SchedulerOutput:
        out = SchedulerOutput(scheduled=scheduled, total_num_tokens=len(scheduled),
                              finished_req_ids=self._finished_ids, decode_block=True, num_steps=K,
                              feed_rows=rows)
        self._finished_ids = []
        self._step_swaps = (0, 0)
        self.num_async_blocks += rows is not None
        return out

    def _admit(self, budget, preempted, scheduled, done, swap_out, outranking_only: bool):
        skipped = []
        headroom = self.cfg.admission_headroom_tokens > 0 and not self.priority
        reserve = None  # blocks the running sequences' growth holds back (_headroom_blocks), once needed
        while self.waiting and budget > 0 and len(self.running) < self.cfg.max_num_seqs:
            seq = self.waiting[0]
            if not self._sibling_ready(seq):
                skipped.append(self.waiting.popleft())
                continue
            if outranking_only:
                others = [r for r in self.running if r.seq_id not in done]
                if not others or self._rank(seq) >= self._rank(max(others, key=self._rank)):
                    break
            elif preempted and not self.priority:
                break
            computed = self.kv.get_computed_blocks(seq) if seq.num_computed_tokens == 0 else []
            cached_tokens = len(computed) * self.block_size
            remaining = seq.num_tokens - seq.num_computed_tokens - cached_tokens
            if not self.cfg.enable_chunked_prefill and remaining > budget:
                break
            num_new = min(remaining, budget, self._threshold())
            extra = 0  # blocks of seq's own growth past this chunk, held back once admitted
            if headroom and self.running:
                if reserve is None:
                    reserve = self._headroom_blocks(self.running)
                extra = max(0, self._headroom_target(seq)
                            - self._blocks(seq.num_computed_tokens + cached_tokens + num_new))
            if not self.kv.can_allocate(seq, num_new, computed, spare=-(reserve or 0) - extra):
                if self.priority and self._make_room_for(seq, num_new, computed, done, swap_out):
                    preempted = True
                else:
                    break
            self.waiting.popleft()
            first_admission = seq.status == RequestStatus.WAITING
            self.kv.allocate(seq, num_new, computed)
            if first_admission:
                seq.num_cached_tokens = cached_tokens
                self.kv.record_query(seq.num_prompt_tokens, cached_tokens)
                self._step_hits += cached_tokens
            seq.status = RequestStatus.RUNNING
            self.running.append(seq)
            scheduled.append((seq, num_new))
            done.add(seq.seq_id)
            budget -= num_new
            if reserve is not None:
                reserve += extra
        for s_ in reversed(skipped):
            self.waiting.appendleft(s_)
        if self.priority:
            self.waiting = deque(sorted(self.waiting, key=self._rank))
        return budget, preempted

    def _threshold(self) -> int:
        t = self.cfg.long_prefill_token_threshold
        return t if t > 0 else 1 << 30

    def _chunk(self, seq: Sequence, budget: int) -> int:
        remaining = seq.num_tokens - seq.num_computed_tokens
        if remaining > 1:  # prefill (or recompute) still in progress
            return min(remaining, budget, self._threshold())
        return min(remaining, budget)

    def _sibling_ready(self, seq: Sequence) -> bool:
        """Samples 1..n-1 wait until sample 0 has its prompt's full blocks in the prefix cache, then
        share them (reference counts) instead of computing the prompt n times."""
        if seq.index == 0 or not self.kv.enable_caching or seq.status != RequestStatus.WAITING:
            return True
        first = seq.request.seqs[0]
        full = (seq.num_prompt_tokens - 1) // self.block_size * self.block_size
        return first.status.finished or first.num_computed_tokens >= full

    def _scheduled_request(self, seq: Sequence, num_new: int, drafts: Optional[list[int]] = None) -> ScheduledRequest:
        start = seq.num_computed_tokens
        if drafts:  # the last token, then the proposal
            return ScheduledRequest(
                req_id=seq.seq_id, token_ids=seq.token_ids[start:start + 1] + drafts, num_computed_tokens=start,
                block_ids=list(seq.block_ids), sample=True, sampling=seq.refresh_sampling(), spec_token_ids=drafts)
        return ScheduledRequest(
            req_id=seq.seq_id, token_ids=seq.token_ids[start:start + num_new], num_computed_tokens=start,
            block_ids=list(seq.block_ids), sample=start + num_new == seq.num_tokens,
            sampling=seq.refresh_sampling())

    # ---- speculative decoding (n-gram lookup) -----------------------------------------------
    def _spec_batch_ok(self, num_running: int) -> bool:
        return num_running <= self.spec_batch_limit

    def _spec_allowed(self, seq: Sequence, ahead: int = 0) -> bool:
        """seq may propose when its length is len + ahead: no per-token host decision (penalties,
        logprobs, stop strings), past min_tokens, room for 2+ more tokens, not backing off."""
        _, limit, min_len, kind = self._stop_check(seq)
        n = len(seq.token_ids) + ahead
        return kind == 2 and n >= min_len and n >= seq.spec_resume_at and n + 2 <= limit

    def _lookup(self, seq: Sequence, k: int) -> list[int]:
        if seq.ngram is None:
            seq.ngram = NgramIndex(self.spec.ngram_prompt_lookup_min, self.spec.ngram_prompt_lookup_max,
                                   source=seq.request.prediction_token_ids)
        return seq.ngram.propose(seq.token_ids, k)

    def _spec_ready(self, seq: Sequence, ahead: int = 0) -> bool:
        """seq would propose tokens: allowed, and the lookup finds a continuation for its text as the
        host knows it (with `ahead` tokens still on the device, the text a few tokens back: in a
        repeating stretch that predicts a hit). Steps run ahead of the host unless this holds, so
        text that never repeats costs a dictionary lookup per token, not a synchronous step."""
        return self._spec_allowed(seq, ahead) and bool(self._lookup(seq, 1))

    def _any_spec_ready(self, seqs, ahead: int = 0) -> bool:
        return self.spec is not None and self._spec_batch_ok(len(seqs)) and \
            any(self._spec_ready(s, ahead) for s in seqs)

    def _propose(self, seq: Sequence, cap: int) -> Optional[list[int]]:
        """Up to min(k, cap) proposed tokens for a decoding sequence, none past its length limit."""
        if cap < 1 or not self._spec_allowed(seq):
            return None
        k = min(self.spec.num_speculative_tokens, cap, self._stop_check(seq).limit - len(seq.token_ids) - 1)
        d = self._lookup(seq, k)
        if not d:  # (a step that waited for the host to propose found nothing after all)
            self._spec_back_off(seq)
        return d or None

    def _spec_back_off(self, seq: Sequence) -> None:
        seq.spec_backoff = min(2 * seq.spec_backoff, SPEC_MAX_BACKOFF) if seq.spec_backoff else 1
        seq.spec_resume_at = len(seq.token_ids) + seq.spec_backoff

    def _update_spec(self, seq: Sequence, sr: ScheduledRequest, emitted: list[int]) -> list[int]:
        """A row that carried proposed tokens: the fed token and every accepted one are now
        cached; its tokens are taken up to the first stop."""
        accepted = len(emitted) - 1
        self.num_spec_drafts += 1
        self.num_spec_draft_tokens += len(sr.spec_token_ids)
        self.num_spec_accepted_tokens += accepted
        if accepted:
            seq.spec_backoff = 0
        new = self._take_tokens(seq, emitted)
        if seq.status == RequestStatus.RUNNING:
            if not accepted:
                self._spec_back_off(seq)
            self.kv.cache_computed(seq)
        return new

    # ---- preemption -------------------------------------------------------------------------
    def _pick_victim(self, exclude: set) -> Optional[Sequence]:
        cands = [s for s in self.running if s.seq_id not in exclude]
        return max(cands, key=self._rank) if cands else None

    def _make_room_for(self, seq, num_new, computed, done, swap_out) -> bool:
        """Priority policy: preempt running sequences ranked below `seq` until it fits."""
        while not self.kv.can_allocate(seq, num_new, computed):
            victim = self._pick_victim(exclude=done)
            if victim is None or self._rank(victim) <= self._rank(seq):
                return False
            self._preempt(victim, swap_out)
        return True

    def _preempt(self, seq: Sequence, swap_out: list) -> None:
        self.running.remove(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1
        self._step_preempted.append(seq.seq_id)
        if self.swap_mode and len(self.host_free) >= len(seq.block_ids) and seq.block_ids:
            slots = [self.host_free.pop() for _ in seq.block_ids]
            swap_out.extend(zip(seq.block_ids, slots))
            seq.host_blocks = slots
            self.kv.free(seq)
            seq.status = RequestStatus.SWAPPED
            self.swapped.append(seq)
            return
        self.kv.free(seq)
        seq.num_computed_tokens = 0
        seq.status = RequestStatus.PREEMPTED
        self._enqueue(seq, front=True)

    # ---- results ----------------------------------------------------------------------------
    def update_from_output(self, so: SchedulerOutput, out: ModelRunnerOutput) -> list[SeqUpdate]:
        if so.decode_block:
            return self._update_multistep(so, out)
        sampled = dict(zip(out.req_ids, np.asarray(out.sampled_token_ids).tolist()))
        updates = []
        for sr in so.scheduled:
            seq = self.seqs.get(sr.req_id)
            if seq is None or seq.status != RequestStatus.RUNNING:
                continue  # aborted meanwhile
            if sr.spec_token_ids:
                updates.append(self._update(seq, self._update_spec(seq, sr, out.spec_token_ids[sr.req_id])))
                continue
            seq.num_computed_tokens += len(sr.token_ids)
            self.kv.cache_computed(seq)
            if not sr.sample:
                continue
            tok = sampled[sr.req_id]
            seq.token_ids.append(tok)
            reason = self._stops(seq, tok)
            if reason is not None:
                self._finish(seq, reason)
            updates.append(self._update(seq, [tok]))
        return updates

    def _update_multistep(self, so: SchedulerOutput, out: ModelRunnerOutput) -> list[SeqUpdate]:
        """Each sequence takes its K tokens up to the first stop; tokens sampled after a stop
        are dropped (the sequence is finished and its blocks freed)."""
        rows = {rid: r for r, rid in enumerate(out.req_ids)}
        sampled = np.asarray(out.sampled_token_ids).tolist()  # Python ints: [S][K] (or [S])
        updates = []
        for sr in so.scheduled:
            seq = self.seqs.get(sr.req_id)
            if seq is None or seq.status != RequestStatus.RUNNING:
                continue
            row = sampled[rows[sr.req_id]]  # [K] (a scalar from a one-step caller)
            new = self._take_tokens(seq, row if isinstance(row, list) else (row,))
            if seq.status == RequestStatus.RUNNING:
                self.kv.cache_computed(seq)
            updates.append(self._update(seq, new))
        return updates

    def _take_tokens(self, seq: Sequence, toks) -> list[int]:
        """Append tokens that each follow one computed position (the token fed in before each is now
        cached), up to and including the first that stops the sequence; returns those taken."""
        new = []
        for tok in toks:
            seq.num_computed_tokens += 1
            seq.token_ids.append(tok)
            new.append(tok)
            reason = self._stops(seq, tok)
            if reason is not None:
                self._finish(seq, reason)
                break
        return new

    def _stop_check(self, seq: Sequence) -> StopCheck:
        """The sequence's StopCheck (cached on it: its parameters never change)."""
        if seq.stop_check is not None:
            return seq.stop_check
        p = seq.request.params
        ids = set(p.stop_token_ids)
        if not p.ignore_eos:
            ids |= set(seq.request.eos_token_ids)
        limit = self.max_model_len
        if p.max_tokens is not None:
            limit = min(limit, seq.num_prompt_tokens + p.max_tokens)
        kind = 0 if p.needs_penalties or p.logprobs is not None or p.prompt_logprobs is not None else \
            1 if p.stop else 2
        seq.stop_check = StopCheck(frozenset(ids), limit, seq.num_prompt_tokens + p.min_tokens, kind)
        return seq.stop_check

    def _stops(self, seq: Sequence, tok: int) -> Optional[RequestStatus]:
        """_check_stop for the token just appended, with a fast path for the common answer (no
        stop): a cached set of the ids that can stop the sequence and the length it ends at."""
        ids, limit, min_len, _ = self._stop_check(seq)
        n = len(seq.token_ids)
        if n < limit and (tok not in ids or n < min_len):
            return None
        return self._check_stop(seq, tok)

    def _check_stop(self, seq: Sequence, tok: int) -> Optional[RequestStatus]:
        p = seq.request.params
        n_out = seq.num_output_tokens
        if n_out >= p.min_tokens:
            if not p.ignore_eos and tok in seq.request.eos_token_ids:
                seq.stop_reason = None
                return RequestStatus.FINISHED_STOPPED
            if tok in p.stop_token_ids:
                seq.stop_reason = tok
                return RequestStatus.FINISHED_STOPPED
        if p.max_tokens is not None and n_out >= p.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if seq.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    def _update(self, seq: Sequence, new: list[int]) -> SeqUpdate:
        fin = seq.status.value if seq.status.finished else None
        return SeqUpdate(seq.request.request_id, seq.index, seq.seq_id, new, fin,
                         seq.stop_reason if fin else None, seq.num_cached_tokens,
                         fin is not None and seq.request.finished)  # a running sequence: not finished

    def _finish(self, seq: Sequence, status: RequestStatus) -> None:
        if seq.status.finished:
            return
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        elif seq in self.swapped:
            self.swapped.remove(seq)
            self._host_release.extend(seq.host_blocks)
            seq.host_blocks = []
        self.kv.free(seq)
        seq.status = status
        self._finished_ids.append(seq.seq_id)
        req = seq.request
        if req.finished:
            self.requests.pop(req.request_id, None)
            for s in req.seqs:
                self.seqs.pop(s.seq_id, None)

    def finish_sequence(self, seq_id: str, stop_reason: str) -> list[SeqUpdate]:
        seq = self.seqs.get(seq_id)
        if seq is None:
            return []
        seq.stop_reason = stop_reason
        self._finish(seq, RequestStatus.FINISHED_STOPPED)
        return [self._update(seq, [])]

    def abort_request(self, request_id: str) -> list[SeqUpdate]:
        req = self.requests.get(request_id)
        if req is None:
            return []
        ups = []
        for s in req.seqs:
            if not s.status.finished:
                self._finish(s, RequestStatus.FINISHED_ABORTED)
                ups.append(self._update(s, []))
        return ups

    # ---- introspection ----------------------------------------------------------------------
    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_swapped(self) -> int:
        return len(self.swapped)

    def kv_usage(self) -> float:
        return self.kv.usage()

    def reset_prefix_cache(self) -> bool:
        """Drop the prefix cache (vLLM's LLM.reset_prefix_cache); only when no sequence holds
        blocks, else False. Benchmarks call it so a rerun of the same prompts is not a cache hit."""
        return self.kv.pool.reset_prefix_cache()

    @property
    def prefix_queries(self) -> int:
        return self.kv.prefix_queries

    @property
    def prefix_hits(self) -> int:
        return self.kv.prefix_hits

    def step_stats(self) -> dict:
        def state(s: Sequence) -> str:
            if s.status == RequestStatus.RUNNING:
                return "prefilling" if s.num_computed_tokens < s.num_prompt_tokens else "decoding"
            return s.status.value
        pool = self.kv.pool
        return dict(blocks_in_use=pool.num_usable - pool.num_free, blocks_total=pool.num_usable,
                    cached_free_blocks=pool.num_cached_free(), num_running=len(self.running),
                    num_waiting=len(self.waiting), num_swapped=len(self.swapped),
                    prefix_hit_tokens=self._step_hits, preempted=list(self._step_preempted),
                    swap_out=self._step_swaps[0], swap_in=self._step_swaps[1],
                    seq_states={sid: state(s) for sid, s in self.seqs.items()})
