"""Speculative decoding (n-gram lookup): decode tokens/s with it against without, in one process.

One engine, built with speculation on; each arm switches the scheduler's proposer:
  off       no speculation (the baseline: steps run ahead of the host, async scheduling)
  ngram     the n-gram lookup as shipped (proposals from the prompt and output so far)
  oracle    proposals that are the tokens the model will emit (from an `off` run of the same
            prompt, greedy): every proposal accepted, k + 1 tokens a step: the best case of the
            machinery (a k + 1-token step, the verification, a synchronous step)
  contrary  proposals never accepted: the worst case, as the back-off limits it

Decode rate per sequence: (output_len - 1) / (batch e2e - e2e of the same batch with one output
token), medians over --iters, as `jaxserve bench latency`.

    python3 scripts/bench_spec_decode.py                               # Llama-3-8B shapes, dummy weights
    python3 scripts/bench_spec_decode.py --model default --prompts repeat   # the embedded model, real text
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

# Real-text prompts whose continuation repeats what they hold (--prompts repeat).
_REPEAT = [
    "Copy the list exactly.\nList: apples, pears, plums, cherries, grapes, lemons, limes, melons, figs, dates.\n"
    "Copy: apples, pears,",
    "def area(w, h):\n    return w * h\n\n\ndef perimeter(w, h):\n    return 2 * (w + h)\n\n\n"
    "# the same two functions again\ndef area(w, h):\n",
    "The meeting is on Monday at noon in room 4. Repeat: The meeting is on Monday",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b", help="a named config (dummy weights) or 'default'")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=5, help="num_speculative_tokens")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--arms", nargs="+", default=["off", "ngram", "oracle", "contrary"])
    ap.add_argument("--prompts", choices=("random", "repeat"), default="random")
    ap.add_argument("--max-num-batched-tokens", type=int, default=None, help="default: the engine's")
    ap.add_argument("--dtype", default="auto", help="float32: tokens that near-ties cannot flip between step shapes")
    ap.add_argument("--host-times", action="store_true",
                    help="also print, per arm, the host's mean ms per engine step in the scheduler and runner "
                         "calls (sync steps wait inside runner.dispatch for the device)")
    a = ap.parse_args()

    from jaxserve import LLM, SamplingParams
    from jaxserve.core.scheduler import Scheduler

    default = a.model == "default"
    llm = LLM(model=None if default else a.model, load_format="auto" if default else "dummy",
              max_model_len=max(1024, a.input_len + a.output_len + 64), max_num_seqs=max(a.batch_sizes), dtype=a.dtype,
              **({"max_num_batched_tokens": a.max_num_batched_tokens} if a.max_num_batched_tokens else {}),
              speculative_model="[ngram]", num_speculative_tokens=a.k)
    eng = llm.llm_engine
    sched = eng.scheduler
    spec_cfg = sched.spec
    vocab = eng.model.arch.vocab_size
    rng = np.random.default_rng(0)
    shipped = Scheduler._lookup
    reference: dict[tuple, list[int]] = {}  # prompt -> the tokens an `off` run emitted

    def oracle(self, seq, k):  # (the scheduler's lookup: both its readiness test and its proposal)
        ref = reference[tuple(seq.request.prompt_token_ids)]
        o = seq.num_output_tokens
        return ref[o:o + k]

    def contrary(self, seq, k):
        return [(t + 1) % vocab for t in oracle(self, seq, k)]  # never the model's token

    def prompts(b):
        if a.prompts == "repeat":
            tok = eng.tokenizer
            return [tok.encode(_REPEAT[i % len(_REPEAT)]) for i in range(b)]
        return [rng.integers(min(1000, vocab // 2), vocab, a.input_len).tolist() for _ in range(b)]

    def batch(ps, max_tokens):
        for i, p in enumerate(ps):
            eng.add_request(f"r{time.perf_counter_ns()}-{i}", p,
                            SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        t0 = time.perf_counter()
        outs = {}
        while eng.has_unfinished_requests():
            for o in eng.step():
                if o.finished:
                    outs[o.request_id] = o.outputs[0].token_ids
        return time.perf_counter() - t0, [outs[k] for k in sorted(outs, key=lambda r: int(r.rsplit("-", 1)[1]))]

    from jaxserve.bench.timers import Timers

    timers = Timers() if a.host_times else None
    if timers:
        r = eng.runner
        for obj, name in ((sched, "schedule"), (sched, "schedule_next_block"), (sched, "schedule_next_step"),
                          (sched, "update_from_output"), (r, "dispatch"), (r, "collect"), (r, "_forward"),
                          (r, "_check_proposals"), (eng, "step")):
            timers.wrap(obj, name)
    compiles0 = eng.runner.num_compilations()
    for b in a.batch_sizes:
        sets = [prompts(b) for _ in range(a.iters + 1)]  # the first set warms up each arm
        for arm in a.arms:
            sched.spec = None if arm == "off" else spec_cfg
            Scheduler._lookup = {"oracle": oracle, "contrary": contrary}.get(arm, shipped)
            full, one, s0 = [], [], eng.get_stats()
            if timers:
                timers.reset()
            for it, ps in enumerate(sets):
                assert eng.reset_prefix_cache()
                t_full, toks = batch(ps, a.output_len)
                assert eng.reset_prefix_cache()
                t_one, _ = batch(ps, 1)
                if arm == "off":
                    for p, t in zip(ps, toks):
                        reference[tuple(p)] = t
                elif arm in ("oracle", "ngram") and a.arms[0] == "off":
                    diff = [next((j for j, (x, y) in enumerate(zip(reference[tuple(p)], t)) if x != y), None)
                            for p, t in zip(ps, toks)]
                    if any(d is not None for d in diff):  # (first differing output position per sequence)
                        print(json.dumps(dict(kind="spec_mismatch", arm=arm, batch=b, iter=it, first_diff=diff)),
                              flush=True)
                if it:
                    full.append(t_full)
                    one.append(t_one)
            s1 = eng.get_stats()
            decode_s = float(np.median(full)) - float(np.median(one))
            rate = (a.output_len - 1) / decode_s
            drafts = s1.spec_num_draft_tokens - s0.spec_num_draft_tokens
            acc = s1.spec_num_accepted_tokens - s0.spec_num_accepted_tokens
            print(json.dumps(dict(kind="spec_decode", model=a.model, prompts=a.prompts, batch=b, k=a.k, arm=arm,
                                  decode_tok_s_per_seq=round(rate, 1), e2e_s=round(float(np.median(full)), 4),
                                  steps=s1.num_steps - s0.num_steps, draft_tokens=drafts, accepted_tokens=acc,
                                  acceptance=round(acc / drafts, 3) if drafts else None)), flush=True)
            if timers:
                n = max(1, timers.n["step"])
                print(json.dumps(dict(kind="spec_host_ms_per_step", batch=b, arm=arm, engine_steps=n,
                                      **{k: round(1e3 * v / n, 3) for k, v in sorted(timers.s.items())})), flush=True)
    Scheduler._lookup = shipped
    print(json.dumps(dict(kind="spec_decode_compilations", during_runs=eng.runner.num_compilations() - compiles0)))


if __name__ == "__main__":
    main()
