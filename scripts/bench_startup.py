"""Start-up time (load dummy weights + compile every bucket) of one engine configuration, in a
fresh process, and a check that serving then never compiles. One JSON line.

    python3 scripts/bench_startup.py --cache-dir "" --threads 1      # sequential, no cache
    python3 scripts/bench_startup.py --cache-dir /tmp/xc --threads 8 # parallel into a cold cache
    python3 scripts/bench_startup.py --cache-dir /tmp/xc --threads 8 # again: a warm restart
"""
import argparse
import json
import os
import time


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="llama-3-8b")
    ap.add_argument("--cache-dir", default="")
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    a = ap.parse_args()
    t0 = time.perf_counter()
    from jaxserve import LLM, SamplingParams

    llm = LLM(a.model, load_format="dummy", max_model_len=a.max_model_len, max_num_seqs=256,
              max_num_batched_tokens=a.max_num_batched_tokens, compilation_cache_dir=a.cache_dir,
              warmup_compile_threads=a.threads)
    startup = time.perf_counter() - t0
    eng = llm.llm_engine
    c0 = eng.runner.num_compilations()
    llm.generate([[1000 + i] * (17 * i + 5) for i in range(40)], SamplingParams(max_tokens=20, ignore_eos=True),
                 use_tqdm=False)
    files = len(os.listdir(a.cache_dir)) if a.cache_dir and os.path.isdir(a.cache_dir) else 0
    print(json.dumps(dict(kind="startup", cache_dir=a.cache_dir, threads=a.threads, startup_s=startup,
                          cache_files=files, new_compilations=eng.runner.num_compilations() - c0)), flush=True)


if __name__ == "__main__":
    main()
