"""Tensor, pipeline and data parallelism, and multi-host, on CPU with fake devices (subprocesses,
since the device count is fixed when jax starts). Oracle: the greedy tokens of one device."""
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(__file__)
ENV = dict(os.environ, JAX_PLATFORMS="cpu")


def _layouts(stdout: str) -> dict:
    out = {}
    for line in stdout.splitlines():
        if line.startswith("LAYOUT "):
            tp, pp, dp, js = line.split(" ", 4)[1:]
            out[(int(tp), int(pp), int(dp))] = json.loads(js)
    return out


def _run_together(*argvs, timeout: float) -> str:
    """Runs the check scripts (argv lists) at once and returns their stdouts joined. Each is mostly
    one thread of XLA compilation, so on CI's 2 cores two take about the time of one."""
    procs = [subprocess.Popen([sys.executable, *a], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for a in argvs]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:  # (a timeout: stop the other too)
                p.kill()
    for a, p, (_, err) in zip(argvs, procs, outs):
        assert p.returncode == 0, (a, err[-3000:])
    return "\n".join(so for so, _ in outs)


def test_tp_pp_dp_equal_one_device_and_bad_sizes_are_explained():
    # the float32 layouts (and the refused sizes) in one process, float8 weights, speculation and
    # swap in another, side by side
    script = os.path.join(HERE, "parallel_check.py")
    stdout = _run_together([script, "layouts"], [script, "features"], timeout=1200)
    res = _layouts(stdout)
    one = res[(1, 1, 1)]["tokens"]
    assert len(one) == 5 and all(len(t) == 8 for t in one)
    for layout in [(3, 1, 1), (1, 2, 1), (1, 1, 2), (3, 2, 1)]:
        assert res[layout]["tokens"] == one, layout
    # TP=3: the KV cache is split over the "model" axis of 3 devices
    assert res[(3, 1, 1)]["kv"] == [[[0, 1, 2], [0, 1, 2]]]
    assert "'model'" in res[(3, 1, 1)]["spec"]
    # TP=3: w_gate_up [576, 2, 1536] split on F only, so each rank holds the gate and the up
    # columns of the same 512 features (the tokens above check that they are the right ones)
    assert res[(3, 1, 1)]["gate_up"] == [[None, None, "model"], [[576, 2, 512]]]
    assert res[(1, 1, 1)]["gate_up"][1] == [[576, 2, 1536]]
    # PP=2: the first layer's cache on device 0, the last layer's on device 1
    assert res[(1, 2, 1)]["kv"] == [[[0], [1]]]
    # TP=3 x PP=2: stage 0 on devices 0-2, stage 1 on 3-5
    assert res[(3, 2, 1)]["kv"] == [[[0, 1, 2], [3, 4, 5]]]
    # DP=2: two replicas on their own devices, both given work by the least-loaded router
    assert res[(1, 1, 2)]["kv"] == [[[0], [0]], [[1], [1]]]
    assert all(n > 0 for n in res[(1, 1, 2)]["prompt_tokens"])
    # float8 weights: TP=3 x PP=2 gives the one-device float8 first tokens (the weights and their
    # scales are the same; later tokens may part: a float32 rounding difference between sharded and
    # whole sums can move an activation across an e4m3 rounding boundary, a 1/16 step); wo
    # [K=576 sharded, E] is stored [E, K] with the shards on its last axis
    q = {tuple(int(x) for x in line.split(" ", 3)[1:3]): json.loads(line.split(" ", 3)[3])
         for line in stdout.splitlines() if line.startswith("QLAYOUT ")}
    assert [t[0] for t in q[(3, 2)]["tokens"]] == [t[0] for t in q[(1, 1)]["tokens"]]
    # a row-parallel weight's per-channel scales reduce over all its shards: the same as one device's
    assert q[(3, 2)]["wo_scales"] == q[(1, 1)]["wo_scales"] and q[(3, 2)]["wo_q"] == q[(1, 1)]["wo_q"]
    assert q[(1, 1)]["wo"][0] == "float8_e4m3fn" and q[(3, 2)]["wo"][1] == [None, "model"]
    assert sum(a[0] == b[0] for a, b in zip(q[(1, 1)]["tokens"], one)) >= 3  # first tokens as unquantized
    # swap out 70 blocks and back into others under TP=3 x PP=2 (two chunks, both stages): exact
    swap = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("SWAP "))[5:])
    assert swap["ok"] and swap["layers"] == 30 and any("model" in sp for sp in swap["specs"]), swap
    # n-gram speculation under TP=3 x PP=2: the tokens without it, proposals accepted
    spec = json.loads(next(ln for ln in stdout.splitlines() if ln.startswith("SPEC "))[5:])
    assert spec["same"] and spec["accepted"] > 0, spec
    errors = [line for line in stdout.splitlines() if line.startswith("ERROR ")]
    assert len(errors) == 3, stdout
    assert "tensor_parallel_size=2 does not divide the model's 9 attention heads; sizes that work: [1, 3, 9]" in errors[0]
    assert "pipeline_parallel_size=31 needs 31 devices, 6 visible" in errors[1]
    assert "needs 9 devices, 6 visible" in errors[2] and "xla_force_host_platform_device_count=9" in errors[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_awq_checkpoint_split_over_devices_equals_one_device(tmp_path, smollm2_hf, smollm2_hf_tokenizer):
    """SmolLM2 written as an AWQ checkpoint (tests/models/test_int4.py): TP=3 x PP=2 splits the
    4-bit words and the group scales of a row-parallel projection along its input groups (3 ways
    within a stage) and gives the one-device tokens. (The HF model and tokenizer: tests/conftest.py,
    loaded once per session.)"""
    from tests.models.test_int4 import _write_quantized

    _write_quantized(smollm2_hf, smollm2_hf_tokenizer, str(tmp_path / "awq"), "awq")
    # the one-device layout (and the kernel per shard) and TP=3 x PP=2 in two processes, side by side
    script, ckpt = os.path.join(HERE, "int4_check.py"), str(tmp_path / "awq")
    stdout = _run_together([script, ckpt, "one_device"], [script, ckpt, "split"], timeout=1200)
    res = {}
    for line in stdout.splitlines():
        if line.startswith("INT4 "):
            tp, pp, js = line.split(" ", 3)[1:]
            res[(int(tp), int(pp))] = json.loads(js)
    one = res[(1, 1)]["tokens"]
    assert res[(1, 1)]["quantization"] == "awq" and all(len(t) == 8 for t in one)
    assert res[(3, 2)]["tokens"] == one
    # wo [576 in, 576 out]: 72 words and 9 groups of 64 inputs, split 3 ways along the input
    assert res[(3, 2)]["wo"]["qw"] == [["model", None], [[24, 576]]]
    assert res[(3, 2)]["wo"]["s"] == [["model", None], [[3, 576]]]
    assert res[(1, 1)]["wo"]["qw"][1] == [[72, 576]]
    # the kernel per shard (shard_map), column and row splits, equals the one-device product
    errs = json.loads(next(x for x in stdout.splitlines() if x.startswith("SHARDED "))[8:])
    assert errs["col"][1] == [5, 2, 96] and errs["row"][1] == [5, 96]
    assert errs["col"][0] < 1e-5 and errs["row"][0] < 1e-5
    assert errs["col_widen"][1] == [5, 2, 96] and errs["row_widen"][1] == [5, 96]
    assert errs["col_widen"][0] < 1e-5 and errs["row_widen"][0] < 1e-5


def test_two_process_multihost_tensor_parallel_equals_one_process():
    """SmolLM2's 9 heads split 3 ways over 2 processes (2 + 1 CPU devices, gloo collectives)."""
    script = os.path.join(HERE, "multihost_check.py")
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, script, str(pid), "2", port, "3", "1", "default", ndev],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
             for pid, ndev in ((0, "2"), (1, "1"))]
    single = subprocess.run([sys.executable, script, "0", "1", "0", "1", "1", "default", "1"], capture_output=True,
                            text=True, timeout=900, env=ENV)
    outs = [p.communicate(timeout=900) for p in procs]
    assert single.returncode == 0, single.stderr[-3000:]
    tokens = lambda s: json.loads(next(ln for ln in s.splitlines() if ln.startswith("TOKENS "))[7:])  # noqa: E731
    ref = tokens(single.stdout)
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
        assert tokens(so) == ref
    assert "3 global devices, 2 local" in outs[0][1] and "3 global devices, 1 local" in outs[1][1]


def test_split_layers_contiguous_and_balanced():
    import pytest

    from jaxserve.parallel.mesh import ParallelismError
    from jaxserve.parallel.plan import split_layers

    for L in (1, 2, 7, 30, 32, 80):
        for pp in range(1, min(L, 9) + 1):
            st = split_layers(L, pp)
            assert [j for r in st for j in r] == list(range(L))
            assert max(map(len, st)) - min(map(len, st)) <= 1
    with pytest.raises(ParallelismError, match="exceeds the model's 30 layers"):
        split_layers(30, 31)
