"""The CLI: generate, chat (stdin-driven), and the benchmark harness on tiny dummy weights."""
import json
import os
import subprocess
import sys

import pytest

from jaxserve.cli import main

ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def test_bench_throughput_and_latency_tiny(capsys, tmp_path):
    args = ["--model", "tiny", "--load-format", "dummy", "--max-model-len", "128", "--max-num-seqs", "8",
            "--max-num-batched-tokens", "64", "--json"]
    out = tmp_path / "t.json"  # vLLM's names for the lengths and the result file
    assert main(["bench", "throughput", "--random-input-len", "16", "--random-output-len", "8", "--num-prompts", "12",
                 "--output-json", str(out)] + args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == res
    assert res["output_tokens"] == 12 * 8 and res["prompt_tokens"] == 12 * 16
    assert res["compilations_during_run"] == 0
    assert abs(res["output_tokens_per_s"] * res["elapsed_s"] - 96) < 1e-6 * 96 + 1e-3
    assert main(["bench", "latency", "--batch-size", "2", "--input-len", "8", "--output-len", "4",
                 "--num-iters", "3", "--num-iters-warmup", "1"] + args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["batch_size"] == 2 and res["ttft_s"] > 0 and res["decode_tokens_per_s"] > 0
    pct = res["latency_percentiles_s"]  # vLLM's latency report: the median is the median iteration
    assert pct["p50"] == res["e2e_s"] and pct["p10"] <= pct["p50"] <= pct["p99"]
    assert pct["p10"] <= res["avg_latency_s"] <= pct["p99"] and res["ttft_s"] < res["e2e_s"]
    # the decode rate is the 3 tokens after the first over what they add to a 1-token batch's latency
    assert 0 < res["prefill_e2e_s"] < res["e2e_s"]
    assert res["decode_tokens_per_s_per_seq"] == pytest.approx(3 / (res["e2e_s"] - res["prefill_e2e_s"]))
    assert main(["bench", "latency", "--num-iters", "0"] + args) == 2  # refused before start-up


def test_reused_engine_reruns_without_prefix_hits():
    """A suite that reuses one engine times every run on cold prompts: the prefix cache the first
    run filled is reset before the second (without it, every full prompt block would hit)."""
    from jaxserve import LLM
    from jaxserve.bench.offline import run_throughput

    llm = LLM(model="tiny", load_format="dummy", max_model_len=128, max_num_seqs=8, max_num_batched_tokens=64)
    kw = dict(dataset="random", num_prompts=6, input_len=33, output_len=4, llm=llm)
    first, second = run_throughput({}, **kw), run_throughput({}, **kw)
    assert first["prefix_cache_hit_tokens"] == 0 and second["prefix_cache_hit_tokens"] == 0
    for _ in range(2):
        llm.generate([{"prompt_token_ids": list(range(5, 38))}], use_tqdm=False)
    assert llm.get_stats().prefix_cache_hits > 0  # the cache itself still works after a reset
    # prompts the engine refuses (longer than max_model_len) fail the run instead of timing nothing
    import pytest

    with pytest.raises(RuntimeError, match="6 of 6 benchmark requests failed.*max_model_len"):
        run_throughput({}, **{**kw, "input_len": 200})


def test_generate_and_chat_commands():
    common = ["--max-model-len", "256", "--max-num-batched-tokens", "64", "--max-num-seqs", "4", "--no-warmup"]
    # both commands at once (each process is mostly one thread of XLA compilation; CI has 2 cores)
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    gen = subprocess.Popen([sys.executable, "-m", "jaxserve", "generate", "--prompt", "The capital of France is",
                            "--max-tokens", "8", "--temperature", "0"] + common, **pipes)
    chat = subprocess.Popen([sys.executable, "-m", "jaxserve", "chat", "--max-tokens", "12", "--temperature", "0"]
                            + common, **pipes)
    try:
        chat_out, chat_err = chat.communicate("What is the capital of France?\n\n", timeout=300)
        gen_out, gen_err = gen.communicate(timeout=300)
    finally:
        for p in (gen, chat):
            if p.poll() is None:
                p.kill()
    assert gen.returncode == 0, gen_err
    assert "Paris" in gen_out
    assert chat.returncode == 0, chat_err
    assert "assistant>" in chat_out and "Paris" in chat_out


def test_generate_reports_bad_model_cleanly():
    out = subprocess.run([sys.executable, "-m", "jaxserve", "generate", "--prompt", "x", "--model", "/no/such/dir"],
                         capture_output=True, text=True, env=ENV, timeout=120)
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_serve_refuses_multihost_before_loading():
    import pytest

    from jaxserve import server_cli

    with pytest.raises(SystemExit, match="does not support --num-processes > 1"):
        server_cli.main(["--num-processes", "2", "--coordinator-address", "127.0.0.1:1"])


def test_dict_flags_take_json():
    import argparse

    import pytest

    from jaxserve.engine_args import add_engine_args, engine_kwargs_from_args

    ap = argparse.ArgumentParser()
    add_engine_args(ap)
    a = ap.parse_args(["--rope-scaling", '{"rope_type": "dynamic", "factor": 4.0}', "--rope-theta", "500000"])
    kw = engine_kwargs_from_args(a)
    assert kw["rope_scaling"] == {"rope_type": "dynamic", "factor": 4.0} and kw["rope_theta"] == 500000.0
    with pytest.raises(SystemExit):
        ap.parse_args(["--rope-scaling", "dynamic"])
