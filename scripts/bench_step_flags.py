"""One engine step's device time under XLA compile options, in one process: the stage function of
a real decode step (captured from a short generate: batch 1 at ~40 tokens of context, and a
1,024-sequence step at ~140), compiled once per option set, timed pipelined (the KV cache fed
back, as the engine donates it), with the number of kernels XLA emitted at the top level.
Options that this jaxlib does not know are reported and skipped.

    python3 scripts/bench_step_flags.py [--batches 1 1024] [--iters 30] [--prompt-len 128]
    python3 scripts/bench_step_flags.py --sets default --batches 256 1024 --profile /tmp/steps

--profile DIR also runs each step (the first option set only, compiled again without command
buffers so that each kernel names its HLO instruction) under the JAX profiler and prints its device
time by kernel category and, per matrix-product shape, the device time and TFLOP/s of the step's
GEMMs (jaxserve.bench.hlo_dots): the rate each projection runs at inside the step.
"""
from __future__ import annotations

import argparse
import json
import re
import time

OPTION_SETS = {
    "default": {},
    "no_triton_softmax": {"xla_gpu_enable_triton_softmax_fusion": False},
    "triton_softmax_priority": {"xla_gpu_experimental_enable_triton_softmax_priority_fusion": True},
    "triton_multi_output": {"xla_gpu_unsupported_enable_triton_multi_output_fusion": True},
    "block_level_rewriter": {"xla_gpu_experimental_enable_fusion_block_level_rewriter": True},
    "warp_specialization": {"xla_gpu_experimental_enable_triton_warp_specialization": True},
    "no_reduction_epilogue": {"xla_gpu_enable_reduction_epilogue_fusion": False},
    # Hopper's programmatic dependent launch: a kernel starts while its predecessor drains
    "pdl": {"xla_gpu_enable_pdl": True},
    # independent kernels of a command buffer (CUDA graph) as parallel branches of the graph
    "concurrent_region": {"xla_gpu_graph_enable_concurrent_region": True},
    # the host's side of a step: no command buffers; custom calls (the Pallas / Mosaic kernels)
    # recorded into them where their handlers allow; graphs of any size (a step's segments between
    # custom calls are short)
    "cmd_off": {"xla_gpu_enable_command_buffer": ""},
    "cmd_custom_call": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN"},
    # custom calls outside the graphs: launched directly instead of traced (stream capture, cached
    # by their buffers' addresses) into them
    "cmd_no_custom_call": {"xla_gpu_enable_command_buffer": "FUSION,CUBLAS,CUBLASLT,CUDNN"},
    "graph_min_1": {"xla_gpu_graph_min_graph_size": 1},
    # a command buffer's kernels as one chain (the default, LHS, makes a DAG of the scheduler's
    # concurrent regions): a straight-line CUDA graph may launch in less host time
    "serialize": {"xla_gpu_command_buffer_scheduling_mode": "SERIALIZE"},
    # moved buffers reached by remapping virtual addresses instead of updating the graph's nodes
    # (not in jaxlib 0.11.2: reported as an error row, seventeenth session)
    "va_remap": {"xla_gpu_enable_command_buffer_va_remapping": True},
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 1024])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sets", nargs="+", default=list(OPTION_SETS))
    ap.add_argument("--prompt-len", type=int, default=128, help="prompt tokens of the batches over 1")
    ap.add_argument("--profile", default=None, metavar="DIR", help="profile each step's first option set")
    ap.add_argument("--model", default="llama-3-8b", help="a named config for dummy weights; 'default': the embedded model")
    ap.add_argument("--quantization", default=None, help="fp8 | awq | gptq: the dummy weights in that form")
    a = ap.parse_args()

    import functools

    import jax
    import numpy as np

    from jaxserve import LLM, SamplingParams
    from jaxserve.runner import model_runner as mr

    default = a.model == "default"
    llm = LLM(model=None if default else a.model, load_format="auto" if default else "dummy",
              max_model_len=max(2048, a.prompt_len + 64), warmup=False, quantization=a.quantization)
    r = llm.llm_engine.runner
    captured = {}
    fwd = r._forward

    def capture(inp, tokens=None, dense=None):
        n = inp.num_seqs
        if n in a.batches and n not in captured and int(inp.query_start_loc[n]) == n:  # a decode step
            captured[n] = inp
        return fwd(inp, tokens, dense)
    r._forward = capture
    rng = np.random.default_rng(0)
    V = r.arch.vocab_size
    for b in a.batches:
        prompts = [{"prompt_token_ids": rng.integers(0, V, 32 if b == 1 else a.prompt_len).tolist()} for _ in range(b)]
        # enough tokens that every sequence is still decoding once the last prompt is in
        prefill_steps = -(-b * len(prompts[0]["prompt_token_ids"]) // 8192)
        llm.generate(prompts, SamplingParams(max_tokens=prefill_steps + 12, ignore_eos=True), use_tqdm=False)
    r._forward = fwd
    for b in a.batches:
        inp = captured[b]
        T = len(inp.token_ids)
        base_opts = mr._LARGE_STEP_OPTIONS if T > mr._TRITON_GEMM_MAX_TOKENS else {}
        base_t, base_out = None, None
        for name in a.sets:
            opts = {**base_opts, **OPTION_SETS[name]}
            row = dict(kind="step_flags", batch=b, tokens=T, set=name, options=opts)
            params, kv, tok, meta = r._stage_args(0, inp, r._kv(0))
            try:
                t0 = time.perf_counter()
                exe = jax.jit(functools.partial(r._stage_fn, 0), donate_argnums=(1,)).lower(
                    params, kv, tok, meta).compile(compiler_options=opts)
                row["compile_s"] = round(time.perf_counter() - t0, 1)
            except Exception as e:  # an option this jaxlib does not have
                print(json.dumps(dict(row, error=str(e)[:200])), flush=True)
                continue
            entry = exe.as_text().split("\nENTRY", 1)[1]
            row["kernels"] = len(re.findall(r"= \S+ (?:fusion|custom-call)\(", entry))
            for _ in range(3):
                out, kv = exe(params, kv, tok, meta)
            jax.block_until_ready(out)
            t0 = time.perf_counter()
            for _ in range(a.iters):
                out, kv = exe(params, kv, tok, meta)
            host = (time.perf_counter() - t0) / a.iters  # held to the device's pace past the in-flight limit: see host_same_ms
            jax.block_until_ready(out)
            t = (time.perf_counter() - t0) / a.iters
            # The host's own time per call, under the runtime's in-flight limit (~28 executions:
            # over 100 calls the host is held back to the device's pace): the same input buffers
            # every call, then fresh ones every call as the engine's steps have (a command buffer
            # whose buffers moved is updated on the host before it launches).
            for label, feed in (("same", [(tok, meta)] * 16), ("fresh", fresh_inputs(tok, meta, 16))):
                jax.block_until_ready(kv)
                t1 = time.perf_counter()
                for tk, me in feed:
                    out, kv = exe(params, kv, tk, me)
                row[f"host_{label}_ms"] = round((time.perf_counter() - t1) / len(feed) * 1e3, 4)
                jax.block_until_ready(out)
                row[f"wall_{label}_ms"] = round((time.perf_counter() - t1) / len(feed) * 1e3, 4)
            r._set_kv(0, kv)
            base_t = base_t or t
            outs = [np.asarray(x, np.float32) for x in jax.tree.leaves(out)]
            base_out = base_out or outs  # the same inputs each call: options must not change the results
            row.update(ms=round(t * 1e3, 4), host_dispatch_ms=round(host * 1e3, 4), over_default=round(t / base_t, 4),
                       max_abs_diff=float(max(np.abs(x - y).max() for x, y in zip(outs, base_out))))
            print(json.dumps(row), flush=True)
            if a.profile and name == a.sets[0]:
                step = jax.jit(functools.partial(r._stage_fn, 0), donate_argnums=(1,))
                kv = profile_step(lambda o: step.lower(params, kv, tok, meta).compile(compiler_options=o),  # noqa: B023
                                  (params, kv, tok, meta), a.iters, f"{a.profile}/b{b}", row)
                r._set_kv(0, kv)


def fresh_inputs(tok, meta, n: int) -> list:
    """n copies of a step's (token ids, metadata): host arrays as they are (each call transfers
    them into new buffers), device arrays each in its own buffer."""
    import jax
    import numpy as np

    return [tuple(np.array(x) if isinstance(x, np.ndarray) else jax.device_put(np.asarray(x), x.sharding)
                  for x in (tok, meta)) for _ in range(n)]


def profile_step(compile_step, args, iters: int, trace_dir: str, row: dict):
    """Compile the step again without command buffers (inside one, every kernel is tagged with the
    buffer's name, not its HLO instruction), run it iters times under the profiler and print its
    device time by category and its GEMMs' rates per shape. compile_step(options) -> executable.
    Returns the KV cache (donated each call)."""
    import jax

    from jaxserve.bench import profile as prof
    from jaxserve.bench.hlo_dots import dot_rates

    exe = compile_step({**row["options"], "xla_gpu_enable_command_buffer": ""})
    params, kv, tok, meta = args
    out, kv = exe(params, kv, tok, meta)
    jax.block_until_ready(out)
    with jax.profiler.trace(trace_dir):
        for _ in range(iters):
            out, kv = exe(params, kv, tok, meta)
        jax.block_until_ready(out)
    summ = prof.summarize(trace_dir, 0.0, top=12)
    print(json.dumps(dict(kind="step_profile", batch=row["batch"], tokens=row["tokens"], command_buffers=False,
                          device_ms_per_step=round(summ.get("kernel_s", 0) * 1e3 / iters, 4),
                          by_category=summ.get("by_category"), top_kernels=summ.get("top_kernels"))), flush=True)
    plane = "/host:CPU" if jax.devices()[0].platform == "cpu" else "/device:GPU"  # (CPU: CI runs this)
    for d in dot_rates(exe.as_text(), prof.op_times(trace_dir, plane), iters):
        print(json.dumps(dict(kind="step_gemm", batch=row["batch"], tokens=row["tokens"], **d)), flush=True)
    return kv


if __name__ == "__main__":
    main()
