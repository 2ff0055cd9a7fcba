"""Shared by the parallelism checks (each runs in its own process with fake CPU devices)."""
PROMPTS = ["The capital of France is", "Once upon a time", "def add(a, b):", "1, 2, 3,", "Hello"]


def engine_kwargs(model: str) -> dict:
    kw = dict(dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=64, warmup=False,
              cpu_kv_cache_gib=0.1)
    if model != "default":
        kw.update(model=model, load_format="dummy")
    return kw
