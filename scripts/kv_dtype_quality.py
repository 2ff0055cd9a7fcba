"""How much a float8 KV cache changes the model: the same texts scored (prompt logprobs) with the
model-dtype cache and with --kv-cache-dtype fp8 / fp8_e5m2, on the embedded default model
(or --model). Prints one JSON line per cache dtype: perplexity, mean and max |delta logprob| per
token against the model-dtype cache, and how often the greedy next token changes.

    python scripts/kv_dtype_quality.py [--model PATH] [--dtype float32]
"""
import argparse
import json
import math

TEXTS = [
    "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. It is "
    "named after the engineer Gustave Eiffel, whose company designed and built the tower from 1887 "
    "to 1889 as the centerpiece of the 1889 World's Fair.",
    "def quicksort(xs):\n    if len(xs) <= 1:\n        return xs\n    pivot = xs[len(xs) // 2]\n"
    "    left = [x for x in xs if x < pivot]\n    middle = [x for x in xs if x == pivot]\n"
    "    right = [x for x in xs if x > pivot]\n    return quicksort(left) + middle + quicksort(right)\n",
    "Photosynthesis is the process by which green plants and some other organisms use sunlight to "
    "synthesize foods from carbon dioxide and water. It generally involves the green pigment "
    "chlorophyll and generates oxygen as a by-product.",
    "In mathematics, a prime number is a natural number greater than 1 that is not a product of two "
    "smaller natural numbers. The first primes are 2, 3, 5, 7, 11, 13, 17, 19, 23 and 29.",
]


def score(llm):
    from jaxserve import SamplingParams

    sp = SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1)
    out = []  # per text: (logprob of each prompt token after the first, the rank-1 token there)
    for o in llm.generate(TEXTS, sp, use_tqdm=False):
        ids, pl = o.prompt_token_ids, o.prompt_logprobs[1:]
        out.append(([d[ids[pos]].logprob for pos, d in enumerate(pl, start=1)],
                    [min(d.items(), key=lambda kv: kv[1].rank)[0] for d in pl]))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--dtype", default="float32")
    a = ap.parse_args()
    from jaxserve import LLM

    results = {}
    for kv in ("auto", "fp8", "fp8_e5m2"):
        llm = LLM(a.model, dtype=a.dtype, max_model_len=512, max_num_seqs=4, max_num_batched_tokens=256,
                  enable_prefix_caching=False, kv_cache_dtype=kv, warmup=False, num_gpu_blocks_override=256)
        results[kv] = score(llm)
        del llm
    base = results["auto"]
    for kv, res in results.items():
        lps = [x for text, _ in res for x in text]
        d = [abs(x - y) for (t1, _), (t0, _) in zip(res, base) for x, y in zip(t1, t0)]
        top_changed = sum(a != b for (_, g1), (_, g0) in zip(res, base) for a, b in zip(g1, g0))
        n = len(lps)
        print(json.dumps(dict(kind="kv_dtype_quality", kv_cache_dtype=kv, tokens=n,
                              perplexity=math.exp(-sum(lps) / n), mean_abs_dlogprob=sum(d) / n,
                              max_abs_dlogprob=max(d), greedy_next_token_changed=top_changed)), flush=True)


if __name__ == "__main__":
    main()
