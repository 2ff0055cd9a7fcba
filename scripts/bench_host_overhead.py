"""Host-side cost of one engine step (scheduler + input staging + sampling-state packing +
output processing), with the device work replaced by a stub that samples instantly.

Decode-heavy steps of a large batch must cost far less host time than the device step they feed
(an 8B decode step at batch 256 is ~10 ms on an H100), or the GPU waits on Python. Run:
    python scripts/bench_host_overhead.py --num-seqs 256 --output-len 128 [--profile]
With --real-runner it also reports the host time of runner.dispatch (input staging, transfers,
jit dispatch); run it against another tree with `cd TREE && PYTHONPATH=$PWD python
/path/to/this/script --real-runner` for a same-machine A/B.
"""
from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402

from jaxserve import LLM, SamplingParams  # noqa: E402
from jaxserve.core.sched_output import ModelRunnerOutput  # noqa: E402
from jaxserve.runner.input_batch import prepare_inputs  # noqa: E402
from jaxserve.runner.sampling_inputs import pack_sampling  # noqa: E402


class StubRunner:
    """Does the runner's host work (prepare_inputs, pack_sampling) but no device work."""

    def __init__(self, real):
        self.real = real
        self.rng = np.random.default_rng(0)

    def execute(self, so):
        r = self.real
        inp = prepare_inputs(so, block_size=r.block_size, max_blocks_per_seq=r.max_blocks_per_seq,
                             token_buckets=r.token_buckets, seq_rows=r.seq_bucket)
        states = [None] * len(inp.seq_lens)
        for i in inp.sample_rows:
            states[i] = so.scheduled[i].sampling
        pack_sampling(states, len(states), r.max_model_len)
        rows = inp.sample_rows
        shape = (len(rows), so.num_steps) if so.num_steps > 1 else (len(rows),)
        return ModelRunnerOutput(req_ids=[so.scheduled[i].req_id for i in rows],
                                 sampled_token_ids=self.rng.integers(100, 400, shape).astype(np.int32))

    def dispatch(self, so, prev=None):
        from jaxserve.runner.model_runner import PendingStep

        return PendingStep(so, out=self.execute(so))

    def collect(self, p):
        return p.out

    def num_compilations(self):
        return 0


def e2e(num_prompts: int, input_lens: tuple[int, int], output_len: int, budget: int, layers: int) -> None:
    """End-to-end wall time of LLM.generate on a small real model (the CPU backend runs the model),
    best of three, and how many steps were scheduled ahead: an A/B of scheduling changes between
    trees (run from each tree's root with PYTHONPATH=$PWD)."""
    from jaxserve.models import loader

    name = f"tiny-{layers}l"
    loader.DUMMY_SHAPES[name] = dict(loader.DUMMY_SHAPES["tiny"], num_hidden_layers=layers)
    llm = LLM(name, load_format="dummy", max_model_len=512, max_num_seqs=32, max_num_batched_tokens=budget,
              cpu_kv_cache_gib=0.25)
    rng = np.random.default_rng(0)
    prompts = [{"prompt_token_ids": rng.integers(100, 400, int(rng.integers(*input_lens))).tolist()}
               for _ in range(num_prompts)]
    sp = SamplingParams(max_tokens=output_len, ignore_eos=True, temperature=0.8, seed=1)
    llm.generate(prompts[:8], sp, use_tqdm=False)
    best = float("inf")
    for _ in range(3):
        llm.reset_prefix_cache()
        t0 = time.perf_counter()
        llm.generate(prompts, sp, use_tqdm=False)
        best = min(best, time.perf_counter() - t0)
    s = llm.llm_engine.scheduler
    print(f"e2e best wall {best:.3f} s, steps {llm.llm_engine.get_stats().num_steps}, "
          f"scheduled ahead of mixed steps {getattr(s, 'num_async_mixed', 'n/a')}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--stream", action="store_true", help="report every step (server) instead of final only")
    ap.add_argument("--num-scheduler-steps", type=int, default=1)
    ap.add_argument("--no-async-scheduling", action="store_true")
    ap.add_argument("--real-runner", action="store_true", help="keep the real runner (jit dispatch, transfers) on "
                    "a 32-layer model of tiny width, whose device work is negligible: host time with dispatch")
    ap.add_argument("--num-prompts", type=int, default=None,
                    help="requests to add (default: --num-seqs); more than --num-seqs keeps prefill steps coming")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: max(2048, --num-seqs)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--e2e", action="store_true", help="instead: wall time of generate() on an 8-layer tiny model, "
                    "96 prompts of 100-300 tokens, 16 out, 512-token steps")
    a = ap.parse_args()
    if a.e2e:
        return e2e(96, (100, 300), 16, 512, 8)
    from jaxserve.models import loader

    loader.DUMMY_SHAPES["tiny-32l"] = dict(loader.DUMMY_SHAPES["tiny"], num_hidden_layers=32)
    llm = LLM("tiny-32l" if a.real_runner else "tiny", load_format="dummy", max_model_len=a.input_len + a.output_len + 16,
              max_num_seqs=a.num_seqs, max_num_batched_tokens=a.max_num_batched_tokens or max(2048, a.num_seqs),
              warmup=a.real_runner,
              cpu_kv_cache_gib=0.5, num_scheduler_steps=a.num_scheduler_steps,
              async_scheduling=not a.no_async_scheduling)
    eng = llm.llm_engine
    dispatch_s = []  # with the real runner: host time of runner.dispatch for full-batch decode blocks
    if not a.real_runner:
        eng.runner = StubRunner(eng.runner)
    else:
        real_dispatch = eng.runner.dispatch

        def timed_dispatch(so, prev=None):
            t0 = time.perf_counter()
            p = real_dispatch(so, prev)
            if so.decode_block and len(so.scheduled) == a.num_seqs:
                dispatch_s.append(time.perf_counter() - t0)
            return p
        eng.runner.dispatch = timed_dispatch
    rng = np.random.default_rng(1)
    for i in range(a.num_prompts or a.num_seqs):
        eng.add_request(str(i), rng.integers(100, 400, a.input_len).tolist(),
                        SamplingParams(max_tokens=a.output_len, ignore_eos=True, temperature=1.0), stream=a.stream)
    prof = cProfile.Profile() if a.profile else None
    steps, t_decode, n_decode, tok_decode = 0, 0.0, 0, 0
    prefill_s = []  # host seconds of steps that carry prompt tokens (what a GPU waits on between them)
    seen = []  # the scheduler outputs dispatched during one engine step
    inner_dispatch = eng.runner.dispatch

    def recording_dispatch(so, prev=None):
        seen.append(so)
        return inner_dispatch(so, prev)
    eng.runner.dispatch = recording_dispatch
    if prof:
        prof.enable()
    while eng.has_unfinished_requests():
        t0 = time.perf_counter()
        so_before = eng.scheduler.num_running
        gen0 = eng.get_stats().generation_tokens_total
        seen.clear()
        eng.step()
        dt = time.perf_counter() - t0
        steps += 1
        if any(so.total_num_tokens > len(so.scheduled) for so in seen):
            prefill_s.append(dt)
        if so_before == a.num_seqs:  # a full decode step
            t_decode += dt
            n_decode += 1
            tok_decode += eng.get_stats().generation_tokens_total - gen0
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    per_tok = t_decode / max(tok_decode, 1) * a.num_seqs  # host seconds per decode position of the batch
    print(f"steps={steps} full-batch decode rounds={n_decode} host ms per batch-token={1e3 * per_tok:.2f} "
          f"(us/seq {1e6 * per_tok / a.num_seqs:.1f}) stream={a.stream} num_scheduler_steps={a.num_scheduler_steps}")
    if prefill_s:
        print(f"steps with prompt tokens: {len(prefill_s)}, host ms median {1e3 * np.median(prefill_s):.2f}, "
              f"mean {1e3 * np.mean(prefill_s):.2f}")
    if dispatch_s:  # staging, host-to-device transfers and jit dispatch of one decode block
        print(f"runner.dispatch of a full decode block: median {1e3 * np.median(dispatch_s):.3f} ms, "
              f"p10 {1e3 * np.percentile(dispatch_s, 10):.3f} ms over {len(dispatch_s)}")


if __name__ == "__main__":
    main()
