"""Speculative decoding in the scheduler (n-gram proposals), driven by a fake model: which
sequences propose, how many tokens, and how accepted tokens advance a sequence. Oracle: the
same fake model decoding one token per step."""
import numpy as np

from jaxserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from jaxserve.core.ngram import NgramIndex
from jaxserve.core.sched_output import ModelRunnerOutput
from jaxserve.core.scheduler import Scheduler
from tests.core.helpers import check_invariants, req


def make(k=4, rows=256, spec=True, **kw):
    sp = SpeculativeConfig(speculative_model="[ngram]", num_speculative_tokens=k, ngram_prompt_lookup_min=2) \
        if spec else None
    return Scheduler(SchedulerConfig(**kw), CacheConfig(block_size=4), num_device_blocks=64, num_host_blocks=0,
                     block_size=4, max_model_len=200, speculative=sp, max_spec_rows=rows)


def periodic(tokens):
    """The fake model: continues 1 2 3 1 2 3 ... by position."""
    return (1, 2, 3)[len(tokens) % 3]


def run_step(s, model):
    """One schedule + fake model step; rows with proposals emit the model's tokens up to and
    including the first that differs from the proposal (the runner's rule)."""
    so = s.schedule()
    ids, toks, spec = [], [], {}
    for sr in so.scheduled:
        if not sr.sample:
            continue
        seq = s.seqs[sr.req_id]
        ids.append(sr.req_id)
        if sr.spec_token_ids:
            assert sr.token_ids == seq.token_ids[-1:] + sr.spec_token_ids
            ctx, emitted = list(seq.token_ids), []
            for d in sr.spec_token_ids + [None]:
                emitted.append(model(ctx))
                if emitted[-1] != d:
                    break
                ctx.append(d)
            spec[sr.req_id] = emitted
            toks.append(emitted[0])
        else:
            toks.append(model(seq.token_ids))
    out = ModelRunnerOutput(ids, np.asarray(toks, np.int32))
    out.spec_token_ids = spec
    return so, s.update_from_output(so, out)


def generate(s, model, requests):
    for r in requests:
        s.add_request(r)
    got, steps = {r.request_id: [] for r in requests}, 0
    while s.has_unfinished_requests():
        _, ups = run_step(s, model)
        steps += 1
        check_invariants(s)
        for u in ups:
            got[u.request_id] += u.new_token_ids
        for seq in s.running:
            assert seq.num_computed_tokens == seq.num_tokens - 1  # every decode fed its last token
    return got, steps


def test_accepted_proposals_give_the_one_token_per_step_tokens_in_fewer_steps():
    prompt = [1, 2, 3, 1, 2, 3, 1]
    want, base_steps = generate(make(spec=False), periodic, [req("a", prompt, max_tokens=23)])
    s = make(k=4)
    got, steps = generate(s, periodic, [req("a", prompt, max_tokens=23)])
    assert got == want and len(got["a"]) == 23  # exactly max_tokens: no proposal runs past it
    assert steps <= 1 + -(-23 // 5) < base_steps  # prefill, then up to k + 1 tokens a step
    assert s.num_spec_accepted_tokens == s.num_spec_draft_tokens > 0
    assert s.kv.pool.num_free == s.kv.pool.num_usable


def contrary(tokens):
    """A fake model that never says what the n-gram lookup proposes (tokens 3 and 4)."""
    d = NgramIndex(2, 4).propose(tokens, 1)
    return 7 - d[0] if d else 3


def test_rejected_proposals_back_off():
    """Every proposal's first token is rejected: each such step yields the model's own token,
    and the sequence waits 1, 2, 4, ... tokens before looking up again."""
    prompt = [3, 4, 3, 3, 4]
    want, _ = generate(make(spec=False), contrary, [req("a", prompt, max_tokens=40)])
    s = make(k=4)
    got, steps = generate(s, contrary, [req("a", prompt, max_tokens=40)])
    assert got == want and steps == 40  # the prefill samples the first token, then one a step
    assert s.num_spec_accepted_tokens == 0
    assert 3 <= s.num_spec_drafts <= 6  # 39 decodes, looked up 1, 2, 4, 8, 16 tokens apart


def test_proposals_fit_the_verification_rows_and_the_token_budget():
    s = make(k=4, rows=6, max_num_batched_tokens=64)
    for rid in ("a", "b"):
        s.add_request(req(rid, [1, 2, 3, 1, 2, 3, 1], max_tokens=40))
    run_step(s, periodic)  # the prompts
    so, _ = run_step(s, periodic)
    spec = [len(sr.spec_token_ids or []) for sr in so.scheduled]
    assert spec == [4, 0]  # a takes 5 of the 6 rows; b's 1 + k would not fit
    assert so.total_num_tokens == 5 + 1
    s2 = make(k=4, max_num_batched_tokens=3)
    s2.add_request(req("a", [1, 2, 3, 1, 2, 3, 1], max_tokens=40))
    run_step(s2, periodic)
    run_step(s2, periodic)
    run_step(s2, periodic)  # (the 3-token budget prefills the prompt in chunks)
    so, _ = run_step(s2, periodic)
    assert so.total_num_tokens <= 3 and len(so.scheduled[0].spec_token_ids) == 2


def test_no_proposals_where_each_token_needs_the_host():
    s = make(k=4)
    for rid, kw in (("pen", dict(presence_penalty=0.5)), ("lp", dict(logprobs=2)), ("min", dict(min_tokens=8))):
        s.add_request(req(rid, [1, 2, 3, 1, 2, 3, 1], max_tokens=10, **kw))
    for _ in range(4):
        so, _ = run_step(s, periodic)
        assert not any(sr.spec_token_ids for sr in so.scheduled)


def test_proposals_stop_decode_blocks_until_they_back_off():
    s = make(k=4, num_scheduler_steps=4, async_scheduling=True)
    s.add_request(req("a", [1, 2, 3, 1, 2, 3, 1], max_tokens=40))
    run_step(s, periodic)
    so, _ = run_step(s, periodic)
    assert not so.decode_block and so.scheduled[0].spec_token_ids
    s2 = make(spec=False, num_scheduler_steps=4, async_scheduling=True)
    s2.add_request(req("a", [1, 2, 3, 1, 2, 3, 1], max_tokens=40))
    run_step(s2, periodic)
    assert run_step(s2, periodic)[0].decode_block
