"""The engine probe scripts run on the embedded model (CPU) so they cannot rot:
scripts/bench_host_step.py (the host's share of each engine step), scripts/bench_step_flags.py
(one decode step under XLA compile options) and scripts/bench_spec_decode.py (speculation's
arms). The probes run side by side (the started_probes fixture)."""
import json
import os
import subprocess
import sys

import pytest

ENV = dict(os.environ, JAX_PLATFORMS="cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _probes(profile_dir: str) -> dict:
    """Each test's probe command line."""
    return {
        # a 64-token step budget holds the 32-token prompt: 2 token buckets to warm up instead of 5
        # (the 1,024- and 2,048-token ones were most of this test's time)
        "test_host_step_accounts_for_every_step_and_the_one_step_block_after_first_tokens": [
            "scripts/bench_host_step.py", "--model", "default", "--steps", "1", "4", "--output-len", "8", "--iters", "1",
            "--max-num-batched-tokens", "64"],
        "test_step_flags_times_the_step_and_reports_unknown_options": [
            "scripts/bench_step_flags.py", "--model", "default", "--batches", "1", "--iters", "2", "--sets", "default",
            "pdl", "--profile", profile_dir],
        "test_spec_decode_bench_arms_bound_the_proposals": [
            "scripts/bench_spec_decode.py", "--model", "default", "--batch-sizes", "1", "--output-len", "16", "--iters",
            "1", "--k", "5", "--host-times", "--input-len", "16", "--max-num-batched-tokens", "128"],
    }


@pytest.fixture(scope="module")
def started_probes(request, tmp_path_factory):
    """Starts the probes of this module's selected tests together (each process is mostly one
    thread of XLA compilation; CI has 2 cores); rows(test name) waits for that test's probe and
    returns its JSON rows."""
    selected = {item.originalname for item in request.session.items if item.path == request.path}  # (notebooks too)
    procs = {name: subprocess.Popen([sys.executable, *args], cwd=ROOT, env=dict(ENV, PYTHONPATH=ROOT),
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for name, args in _probes(str(tmp_path_factory.mktemp("profile"))).items() if name in selected}

    def rows(name: str) -> list:
        out, err = procs[name].communicate(timeout=600)
        assert procs[name].returncode == 0, err[-2000:]
        return [json.loads(line) for line in out.splitlines() if line.startswith("{")]

    yield rows
    for p in procs.values():
        if p.poll() is None:  # (a test that failed before reading its probe)
            p.kill()
            p.communicate()


@pytest.fixture
def rows(started_probes, request) -> list:
    """The JSON rows of this test's probe (_probes)."""
    return started_probes(request.node.originalname)


def test_host_step_accounts_for_every_step_and_the_one_step_block_after_first_tokens(rows):
    k1, k4 = rows
    assert k1["num_scheduler_steps"] == 1 and k1["engine_steps"] == 8  # the prefill's token + 7 decode steps
    # K = 4: the prefill, the one-step block scheduled ahead of its first token, a 4-step block,
    # and the 2 steps max_tokens leaves
    assert k4["engine_steps"] == 4
    for r in rows:
        assert abs(r["tokens_per_s"] * r["wall_s"] - 8) < 1e-6
        per = r["ms_per_engine_step"]
        assert per["dispatch"] + per["collect"] <= per["step"] + 1e-6
        assert 0 < r["host_busy_ms_per_step"] <= r["wall_ms_per_step"]


def test_step_flags_times_the_step_and_reports_unknown_options(rows):
    base = next(r for r in rows if r.get("set") == "default")
    assert base["tokens"] == 16 and base["kernels"] > 0 and base["ms"] > 0 and base["over_default"] == 1.0
    assert base["max_abs_diff"] == 0.0
    other = next(r for r in rows if r.get("set") == "pdl")
    assert "error" in other or other["kernels"] > 0  # an option this jaxlib lacks is a row, not a crash
    # a launch option that the CPU ignores leaves the step's results as they were
    assert "error" in other or other["max_abs_diff"] == 0.0
    # --profile: every projection of SmolLM2's 30 layers at the 16-token bucket, found in the program
    # and timed in the profile (qkv 576 -> 9 x 64 + 2 x 3 x 64, o, gate_up 576 -> 2 x 1536, down)
    gemms = {r["shape"]: r for r in rows if r["kind"] == "step_gemm"}
    for shape in ("16x576x960", "16x576x576", "16x576x3072", "16x1536x576"):
        assert gemms[shape]["per_run"] == 30 and gemms[shape]["us_each"] > 0, (shape, sorted(gemms))


def test_spec_decode_bench_arms_bound_the_proposals(rows):
    """scripts/bench_spec_decode.py on the embedded model: `oracle` proposals (the `off` run's own
    tokens) are all accepted on the CPU and take ceil(15 / 6) steps, `contrary` ones never are, and
    neither changes the tokens (no spec_mismatch line)."""
    arms = {r["arm"]: r for r in rows if r["kind"] == "spec_decode"}
    assert not [r for r in rows if r["kind"] == "spec_mismatch"]
    assert arms["off"]["draft_tokens"] == 0
    assert arms["oracle"]["acceptance"] == 1.0 and arms["contrary"]["accepted_tokens"] == 0
    # two batches each (warm-up + timed) of a prefill and the 15 decodes of 16 tokens: 1 + 3 steps
    # with every 5-token proposal accepted, plus the one-token batches' prefills
    assert arms["oracle"]["steps"] == 2 * (1 + 3 + 1) and arms["off"]["steps"] == 2 * (16 + 1)
    host = {r["arm"]: r for r in rows if r["kind"] == "spec_host_ms_per_step"}
    assert host["oracle"]["_check_proposals"] > 0 and "_check_proposals" not in host["off"]
    assert next(r for r in rows if r["kind"] == "spec_decode_compilations")["during_runs"] == 0
