"""Drive the scheduler without a model: fake runner outputs with chosen tokens."""
import numpy as np

from jaxserve.config import CacheConfig, SchedulerConfig
from jaxserve.core.request import Request
from jaxserve.core.sched_output import ModelRunnerOutput
from jaxserve.core.scheduler import Scheduler
from jaxserve.sampling_params import SamplingParams

EOS = 0


def make_sched(num_blocks=16, block_size=4, max_model_len=None, host_blocks=0, **kw):
    max_model_len = max_model_len or min(64, (num_blocks - 1) * block_size)
    cache_kw = {k: kw.pop(k) for k in list(kw) if k in ("enable_prefix_caching",)}
    return Scheduler(SchedulerConfig(**kw), CacheConfig(block_size=block_size, **cache_kw),
                     num_device_blocks=num_blocks, num_host_blocks=host_blocks, block_size=block_size,
                     max_model_len=max_model_len)


def req(rid, prompt, t=0.0, **params):
    params.setdefault("max_tokens", 4)
    params.setdefault("ignore_eos", True)
    return Request(rid, list(prompt), SamplingParams(**params), {EOS}, t, seed=1,
                   priority=params.pop("priority", 0) if "priority" in params else 0)


def step(s, token_fn=lambda seq_id, n: 100 + n):
    """One schedule + fake model step; token_fn(seq_id, position) picks the sampled token."""
    so = s.schedule()
    ids, toks = [], []
    for sr in so.scheduled:
        if sr.sample:
            ids.append(sr.req_id)
            toks.append(token_fn(sr.req_id, sr.num_computed_tokens + len(sr.token_ids)))
    ups = s.update_from_output(so, ModelRunnerOutput(ids, np.asarray(toks, np.int32)))
    return so, ups


def check_invariants(s):
    pool = s.kv.pool
    holders = {}
    for seq in s.seqs.values():
        for b in seq.block_ids:
            holders[b] = holders.get(b, 0) + 1
    assert 0 not in holders, "null block handed out"
    assert 0 not in pool.free
    for b in range(1, pool.num_blocks):
        assert pool.ref_cnt[b] == holders.get(b, 0), (b, pool.ref_cnt[b], holders.get(b, 0))
        assert (b in pool.free) == (pool.ref_cnt[b] == 0), b
    for h, b in pool.cached.items():
        assert pool.block_hash[b] == h
