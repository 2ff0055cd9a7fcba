"""Writes the notebooks from these cell lists (so they diff as code); CI executes them with nbmake."""
import nbformat as nbf

COMMON_SETUP = """import os, sys
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.abspath(".."))
os.makedirs("figures", exist_ok=True)"""

NOTEBOOKS = {
    "01_quickstart.ipynb": [
        ("md", "# jaxserve quickstart\nOffline generation with `LLM`: the embedded default model "
               "(SmolLM2-135M-Instruct), sampling parameters, chat, logprobs and batches."),
        ("code", COMMON_SETUP),
        ("code", "from jaxserve import LLM, SamplingParams\n"
                 "llm = LLM(max_model_len=512, max_num_seqs=16, max_num_batched_tokens=64)"),
        ("code", "outs = llm.generate([\"The capital of France is\", \"Once upon a time\"],\n"
                 "                    SamplingParams(temperature=0, max_tokens=24))\n"
                 "for o in outs:\n    print(repr(o.prompt), '->', repr(o.outputs[0].text), o.outputs[0].finish_reason)\n"
                 "assert 'Paris' in outs[0].outputs[0].text"),
        ("md", "## Chat with the model's template"),
        ("code", "reply = llm.chat([{\"role\": \"user\", \"content\": \"What is the capital of France?\"}],\n"
                 "                 SamplingParams(temperature=0, max_tokens=24))[0]\nprint(reply.outputs[0].text)"),
        ("md", "## Sampling: seeds make it reproducible; `n` gives several samples"),
        ("code", "sp = SamplingParams(temperature=0.9, top_p=0.95, seed=42, max_tokens=20, n=3)\n"
                 "a = llm.generate(\"A short poem about the sea:\", sp)[0]\n"
                 "b = llm.generate(\"A short poem about the sea:\", sp)[0]\n"
                 "for c in a.outputs: print(c.index, repr(c.text))\n"
                 "assert [c.text for c in a.outputs] == [c.text for c in b.outputs]"),
        ("md", "## Logprobs of each generated token (top 3 alternatives)"),
        ("code", "o = llm.generate(\"The sky is\", SamplingParams(temperature=0, max_tokens=5, logprobs=3))[0]\n"
                 "for tok, d in zip(o.outputs[0].token_ids, o.outputs[0].logprobs):\n"
                 "    alts = sorted(d.items(), key=lambda kv: -kv[1].logprob)[:3]\n"
                 "    print(repr(d[tok].decoded_token), [(v.decoded_token, round(v.logprob, 3)) for _, v in alts])"),
        ("md", "## A batch of prompts, with the progress bar"),
        ("code", "prompts = [f\"Fact number {i} about the moon:\" for i in range(24)]\n"
                 "outs = llm.generate(prompts, SamplingParams(temperature=0.7, max_tokens=16, seed=0))\n"
                 "print(len(outs), 'completions;', llm.get_stats())"),
    ],
    "02_serving.ipynb": [
        ("md", "# Serving: the OpenAI-compatible server\nStart `jaxserve serve` in the background, "
               "call it with the official `openai` client, stream a chat, read `/metrics`."),
        ("code", COMMON_SETUP),
        ("code", "import subprocess, socket, time, httpx\n"
                 "s = socket.socket(); s.bind(('127.0.0.1', 0)); port = s.getsockname()[1]; s.close()\n"
                 "server = subprocess.Popen([sys.executable, '-m', 'jaxserve', 'serve', '--port', str(port),\n"
                 "                           '--max-model-len', '512', '--max-num-batched-tokens', '64'],\n"
                 "                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
                 "base = f'http://127.0.0.1:{port}'\n"
                 "for _ in range(300):\n"
                 "    try:\n        if httpx.get(base + '/ready').status_code == 200: break\n"
                 "    except httpx.HTTPError: pass\n    time.sleep(1)\n"
                 "print(httpx.get(base + '/ready').json())"),
        ("code", "from openai import OpenAI\nclient = OpenAI(base_url=base + '/v1', api_key='unused')\n"
                 "model = client.models.list().data[0].id\n"
                 "r = client.completions.create(model=model, prompt='The capital of France is', max_tokens=8, temperature=0)\n"
                 "print(model, '->', r.choices[0].text, r.usage)"),
        ("code", "stream = client.chat.completions.create(model=model, stream=True, max_tokens=40, temperature=0,\n"
                 "    messages=[{'role': 'user', 'content': 'Name three planets.'}])\n"
                 "for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n"
                 "        print(chunk.choices[0].delta.content, end='', flush=True)"),
        ("code", "metrics = httpx.get(base + '/metrics').text\n"
                 "print('\\n'.join(l for l in metrics.splitlines() if l.startswith('jaxserve:') and '_bucket' not in l))"),
        ("code", "server.terminate(); server.wait(30)"),
    ],
    "03_paged_kv_cache.ipynb": [
        ("md", "# The paged KV cache and continuous batching, drawn from the real engine\n"
               "The engine records one trace record per step (`llm.llm_engine.trace`). A mixed "
               "workload on a deliberately small cache shows blocks filling, requests joining and "
               "leaving every step, prefix-cache hits for a shared system prompt, and preemption."),
        ("code", COMMON_SETUP),
        ("code", "from jaxserve import LLM, SamplingParams\n"
                 "llm = LLM(max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64, num_gpu_blocks_override=24,\n"
                 "          enable_prefix_caching=True, warmup=False)\n"
                 "llm.llm_engine.trace = []\n"
                 "system = 'You are a careful assistant. Answer in one short sentence. ' * 3\n"
                 "prompts = [system + q for q in ['Why is the sky blue?', 'What is rain?', 'Name a metal.',\n"
                 "           'What is a star?', 'Why do leaves fall?', 'What is ice?']] + ['Tell a story: ' * 8, 'Hi']\n"
                 "outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))\n"
                 "trace = llm.llm_engine.trace\nprint(len(trace), 'steps;', llm.get_stats())\n"
                 "print('cached tokens per request:', [o.num_cached_tokens for o in outs])"),
        ("code", "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                 "steps = [r['step'] for r in trace]\n"
                 "fig, ax = plt.subplots(3, 1, figsize=(9, 8), sharex=True)\n"
                 "ax[0].plot(steps, [r['blocks_in_use'] for r in trace], label='blocks in use')\n"
                 "ax[0].plot(steps, [r['cached_free_blocks'] for r in trace], label='cached, free (LRU)')\n"
                 "ax[0].axhline(trace[0]['blocks_total'], ls='--', c='k', label='usable blocks')\n"
                 "ax[0].set_ylabel('KV blocks'); ax[0].legend(loc='upper right')\n"
                 "ax[1].plot(steps, [r['num_running'] for r in trace], label='running')\n"
                 "ax[1].plot(steps, [r['num_waiting'] for r in trace], label='waiting')\n"
                 "pre = [r['step'] for r in trace if r['preempted']]\n"
                 "ax[1].scatter(pre, [0] * len(pre), c='r', marker='x', label='preemption')\n"
                 "ax[1].set_ylabel('sequences'); ax[1].legend(loc='upper right')\n"
                 "ax[2].bar(steps, [r['prefix_hit_tokens'] for r in trace], color='g')\n"
                 "ax[2].set_ylabel('prefix-cache hit tokens'); ax[2].set_xlabel('engine step')\n"
                 "fig.tight_layout(); fig.savefig('figures/kv_cache_over_time.png', dpi=80)\n"
                 "assert pre, 'the small cache should force preemption'\n"
                 "assert sum(r['prefix_hit_tokens'] for r in trace) > 0"),
        ("md", "## Request timeline (Gantt): waiting, prefilling, decoding, preempted"),
        ("code", "colors = {'waiting': '#bbbbbb', 'prefilling': '#1f77b4', 'decoding': '#2ca02c',\n"
                 "          'preempted': '#d62728', 'swapped': '#ff7f0e'}\n"
                 "ids = sorted({sid for r in trace for sid in r['seq_states']}, key=lambda s: int(s))\n"
                 "fig, ax = plt.subplots(figsize=(9, 4))\n"
                 "for row, sid in enumerate(ids):\n"
                 "    for r in trace:\n"
                 "        st = r['seq_states'].get(sid)\n"
                 "        if st in colors: ax.barh(row, 1, left=r['step'] - 0.5, color=colors[st], height=0.8)\n"
                 "ax.set_yticks(range(len(ids))); ax.set_yticklabels([f'request {s}' for s in ids])\n"
                 "ax.set_xlabel('engine step'); ax.set_title('one row per request, one column per step')\n"
                 "from matplotlib.patches import Patch\n"
                 "ax.legend(handles=[Patch(color=c, label=k) for k, c in colors.items()], loc='lower right', fontsize=8)\n"
                 "fig.tight_layout(); fig.savefig('figures/request_timeline.png', dpi=80)"),
    ],
    "04_kernels.ipynb": [
        ("md", "# The Pallas ragged paged-attention kernel against its reference\n"
               "On CPU the kernel runs in interpret mode (correctness only); on a GPU it is compiled "
               "through Triton and timed."),
        ("code", COMMON_SETUP),
        ("code", "import time, numpy as np, jax, jax.numpy as jnp\n"
                 "from pallas_kernels.ragged_paged_attention import kernel as K\n"
                 "from pallas_kernels.ragged_paged_attention.reference import ragged_paged_attention_reference as ref\n"
                 "on_gpu = jax.devices()[0].platform == 'gpu'\n"
                 "rng = np.random.default_rng(0)\n"
                 "def make(q_lens, ctx, hq=8, hkv=2, d=64, bs=16, dtype=jnp.float32):\n"
                 "    nblk = [-(-c // bs) for c in ctx]; perm = rng.permutation(np.arange(1, sum(nblk) + 1))\n"
                 "    bt = np.zeros((len(ctx), max(nblk)), np.int32); o = 0\n"
                 "    for i, n in enumerate(nblk): bt[i, :n] = perm[o:o + n]; o += n\n"
                 "    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)\n"
                 "    q = jnp.asarray(rng.standard_normal((int(qsl[-1]), hq, d)), dtype)\n"
                 "    kv = jnp.asarray(rng.standard_normal((2, sum(nblk) + 1, bs, hkv, d)), dtype)\n"
                 "    return q, kv, jnp.asarray(bt), jnp.asarray(np.asarray(ctx, np.int32)), jnp.asarray(qsl)"),
        ("code", "errs = {}\nfor name, (ql, ctx) in {'decode x4': ([1] * 4, [17, 100, 300, 64]),\n"
                 "                              'mixed': ([20, 1, 1], [20, 513, 40]), 'prefill': ([64], [64])}.items():\n"
                 "    args = make(ql, ctx)\n"
                 "    a = K.ragged_paged_attention(*args, sm_scale=0.125); b = ref(*args, sm_scale=0.125)\n"
                 "    errs[name] = float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))\nprint(errs)\n"
                 "assert max(errs.values()) < 1e-5"),
        ("code", "import matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot as plt\n"
                 "def timed(f, *a, n=5):\n    jax.block_until_ready(f(*a)); t = time.perf_counter()\n"
                 "    for _ in range(n): jax.block_until_ready(f(*a))\n    return (time.perf_counter() - t) / n * 1e3\n"
                 "ctxs = [256, 1024, 4096] if on_gpu else [64, 128, 256]\n"
                 "kern = jax.jit(lambda *a: K.ragged_paged_attention(*a, sm_scale=0.125))\n"
                 "refj = jax.jit(lambda *a: ref(*a, sm_scale=0.125))\n"
                 "tk, tr = [], []\nfor c in ctxs:\n    args = make([1] * 8, [c] * 8)\n"
                 "    tk.append(timed(kern, *args)); tr.append(timed(refj, *args))\n"
                 "fig, ax = plt.subplots(figsize=(6, 3.5))\n"
                 "ax.plot(ctxs, tk, 'o-', label='Pallas kernel' + ('' if on_gpu else ' (interpret mode)'))\n"
                 "ax.plot(ctxs, tr, 's-', label='jnp reference (XLA)')\n"
                 "ax.set_xlabel('context length (8 decoding sequences)'); ax.set_ylabel('ms per call')\n"
                 "ax.set_title(jax.devices()[0].device_kind); ax.legend()\n"
                 "fig.tight_layout(); fig.savefig('figures/kernel_timing.png', dpi=80)"),
    ],
}

for name, cells in NOTEBOOKS.items():
    nb = nbf.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbf.v4.new_markdown_cell(src) if kind == "md" else nbf.v4.new_code_cell(src) for kind, src in cells]
    nbf.write(nb, name)
    print("wrote", name)
