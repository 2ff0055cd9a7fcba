"""Peer baseline: Hugging Face transformers `generate` (eager, bf16, torch) on Llama-3-8B-shaped
random weights, the same shapes as `jaxserve bench`. Prints one JSON line per batch size.

    python3 scripts/bench_hf_baseline.py --batch-sizes 1 32 128 --input-len 128 --output-len 128
"""
import argparse
import json
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

SHAPES = {
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                       rope_theta=500000.0, rms_norm_eps=1e-5),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="llama-3-8b")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=128)
    args = ap.parse_args()
    cfg = LlamaConfig(**SHAPES[args.shape], torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.bfloat16).eval()
    for bs in args.batch_sizes:
        ids = torch.randint(1000, cfg.vocab_size, (bs, args.input_len), device="cuda")
        kw = dict(max_new_tokens=args.output_len, min_new_tokens=args.output_len, do_sample=False,
                  pad_token_id=0)
        with torch.no_grad():
            model.generate(ids[:, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)  # warm-up
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = model.generate(ids, **kw)
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
        n_out = (out.shape[1] - args.input_len) * bs
        print(json.dumps(dict(kind="hf_baseline", shape=args.shape, batch_size=bs, input_len=args.input_len,
                              output_len=args.output_len, elapsed_s=dt, output_tokens_per_s=n_out / dt)),
              flush=True)


if __name__ == "__main__":
    main()
