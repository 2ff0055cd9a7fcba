"""Speculative decoding in the scheduler (n-gram proposals), driven by a fake model: which
sequences propose, how many tokens, and how accepted tokens advance a sequence. Oracle: the
same fake model decoding one token per step."""
import numpy as np
from hypothesis import given, settings, strategies as st

from jaxserve.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from jaxserve.core.ngram import NgramIndex
from jaxserve.core.sched_output import ModelRunnerOutput
from jaxserve.core.scheduler import Scheduler
from tests.core.helpers import check_invariants, req


def make(k=4, rows=256, spec=True, limit=None, **kw):
    sp = SpeculativeConfig(speculative_model="[ngram]", num_speculative_tokens=k, ngram_prompt_lookup_min=2,
                           speculative_disable_by_batch_size=limit) if spec else None
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
    for limit, want in ((None, [0, 0]), (2, [4, 0])):
        s = make(k=4, rows=6, limit=limit, max_num_seqs=4, max_num_batched_tokens=64)
        for rid in ("a", "b"):
            s.add_request(req(rid, [1, 2, 3, 1, 2, 3, 1], max_tokens=40))
        run_step(s, periodic)  # the prompts
        so, _ = run_step(s, periodic)
        # by default no proposals past 6 // (1 + k) = 1 running sequence; allowed two, a takes 5
        # of the 6 rows and b's 1 + k would not fit
        assert [len(sr.spec_token_ids or []) for sr in so.scheduled] == want, limit
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


def window_model(tokens):
    """A fake model of the last two tokens and the length's parity: its text falls into short
    cycles (proposals accepted) that the parity breaks now and then (proposals rejected)."""
    return (tokens[-1] * 7 + tokens[-2] * 3 + (len(tokens) // 5) % 2) % 6 + 1


def random_mix(seed, mode, caching):
    """Random prompts, lengths and n > 1 on a tiny cache, with and without speculation: (the
    tokens without, the tokens with, the speculating scheduler); invariants checked every step."""
    rng = np.random.default_rng(seed)
    specs = [(rng.integers(1, 7, rng.integers(2, 10)).tolist(), int(rng.integers(1, 15)), int(rng.integers(1, 3)))
             for _ in range(6)]
    k = int(rng.integers(1, 6))

    def drive(spec):
        sp = SpeculativeConfig(speculative_model="[ngram]", num_speculative_tokens=k,
                               speculative_disable_by_batch_size=4) if spec else None
        s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=12, preemption_mode=mode,
                                      admission_headroom_tokens=0),
                      CacheConfig(block_size=2, enable_prefix_caching=caching), num_device_blocks=14,
                      num_host_blocks=8, block_size=2, max_model_len=24, speculative=sp, max_spec_rows=9)
        got = {}
        for i, (p, m, n) in enumerate(specs):
            s.add_request(req(f"r{i}", p, max_tokens=m, n=n))
        for _ in range(800):
            if not s.has_unfinished_requests():
                break
            _, ups = run_step(s, window_model)
            check_invariants(s)
            for u in ups:
                got.setdefault((u.request_id, u.index), []).extend(u.new_token_ids)
        assert not s.has_unfinished_requests(), "a request starved"
        assert s.kv.pool.num_free == s.kv.pool.num_usable
        assert all(len(t) == specs[int(r[1:])][1] for (r, _), t in got.items())
        return got, s

    want, _ = drive(False)
    got, s = drive(True)
    return want, got, s


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), mode=st.sampled_from(["recompute", "swap"]), caching=st.booleans())
def test_random_mixes_with_proposals_keep_invariants_and_tokens(seed, mode, caching):
    """Preemptions while rows carry proposals, both preemption modes: every step keeps the block
    invariants, everything finishes, every block comes back, and each request gets the tokens of
    the same scheduler without speculation."""
    want, got, _ = random_mix(seed, mode, caching)
    assert got == want


def test_random_mixes_do_preempt_while_speculating():
    runs = [random_mix(seed, mode, True)[2] for seed in range(6) for mode in ("recompute", "swap")]
    assert any(s.num_preemptions and s.num_spec_accepted_tokens for s in runs)
