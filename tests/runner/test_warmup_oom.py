"""A warm-up step that runs out of device memory (XLA's RESOURCE_EXHAUSTED, as float8 weights
raised on an H200 at a decode bucket the cache sizing had not measured): the KV cache gives the
memory back and warm-up starts over, or, where it may not, a StepOutOfMemoryError says what to
lower. The error is injected at the start of a warm-up pass; the oracle for the shrunk engine is
an engine that never ran out (same greedy tokens)."""
import jax
import pytest

from jaxserve import LLM, SamplingParams
from jaxserve.cli import main
from jaxserve.runner import kv_cache as kvc
from jaxserve.runner import warmup
from jaxserve.runner.model_runner import ModelRunner

KW = dict(dtype="float32", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=64)
PROMPTS = ["The capital of France is", "def add(a, b):\n    return"]


@pytest.fixture(scope="module")
def oracle():
    """The greedy tokens of an engine that never ran out (no injection, full-size cache): built
    once for the tests that compare a shrunk engine with it (an engine build is ~10 s)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    return [o.outputs[0].token_ids for o in LLM(cpu_kv_cache_gib=0.5, **KW).generate(PROMPTS, params)]


def _inject(monkeypatch, asks: str, times: int):
    """The first `times` warm-up passes fail as an XLA out-of-memory error asking for `asks`."""
    seen = []
    original = ModelRunner._run_every_bucket

    def failing(self, parallel, t0, may_shrink=False):
        seen.append(self.num_blocks)
        if len(seen) <= times:
            raise jax.errors.JaxRuntimeError(
                f"RESOURCE_EXHAUSTED: Out of memory while trying to allocate {asks} with allocator GPU_0_bfc")
        return original(self, parallel, t0, may_shrink)

    monkeypatch.setattr(ModelRunner, "_run_every_bucket", failing)
    return seen


def test_requested_bytes_reads_the_size_xla_names():
    assert kvc.requested_bytes("Out of memory while trying to allocate 3.91GiB (rounded to 4202712320)") \
        == int(3.91 * (1 << 30))
    assert kvc.requested_bytes("trying to allocate 512.5MiB with allocator") == int(512.5 * (1 << 20))
    assert kvc.requested_bytes("RESOURCE_EXHAUSTED: out of memory") is None


def test_a_step_that_does_not_fit_shrinks_the_cache_and_the_engine_still_serves(monkeypatch, oracle):
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    seen = _inject(monkeypatch, "64.00MiB", times=1)
    llm = LLM(cpu_kv_cache_gib=0.5, **KW)
    runner, sched = llm.llm_engine.runner, llm.llm_engine.scheduler
    before, after = seen
    assert after == runner.num_blocks < before
    # what the cache gave back covers what the step asked for, and at least 5% of the cache (a
    # restart recompiles every bucket, so one restart should do)
    assert (before - after) * runner.kv_spec.bytes_per_block >= 64 << 20
    assert before - after >= 0.05 * before
    # the scheduler, built after warm-up, hands out exactly the blocks the smaller cache has
    assert sched.kv.pool.num_blocks == runner.num_blocks
    assert all(a.shape[1] == runner.num_blocks for a in runner.kv_caches)
    assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == oracle


def test_a_small_request_gives_back_a_twentieth_of_the_cache(monkeypatch):
    monkeypatch.setattr(warmup, "OOM_MARGIN_BYTES", 0)  # (256 MiB: above 5% of a small cache)
    seen = _inject(monkeypatch, "1.00MiB", times=1)
    runner = LLM(cpu_kv_cache_gib=0.5, **KW).llm_engine.runner
    before, after = seen
    assert after == runner.num_blocks
    assert 0.05 * before <= before - after <= 0.05 * before + 1


def test_a_fixed_cache_size_gets_a_clear_error_instead(monkeypatch):
    _inject(monkeypatch, "1.50GiB", times=1)
    with pytest.raises(kvc.StepOutOfMemoryError) as e:
        LLM(num_gpu_blocks_override=64, **KW)
    msg = str(e.value)
    assert "num_gpu_blocks_override" in msg and "max_num_batched_tokens (now 64" in msg
    assert "1.50GiB" in msg  # XLA's own words stay in the message


def test_no_endless_retries(monkeypatch):
    seen = _inject(monkeypatch, "8.00MiB", times=100)
    with pytest.raises(kvc.StepOutOfMemoryError, match="after giving the KV cache back 3 times"):
        LLM(cpu_kv_cache_gib=1.5, **KW)
    assert len(seen) == 4 and seen == sorted(seen, reverse=True) and len(set(seen)) == 4


def test_the_cli_prints_the_error_not_a_traceback(monkeypatch, capsys):
    _inject(monkeypatch, "2.00GiB", times=1)
    rc = main(["generate", "--prompt", "x", "--dtype", "float32", "--max-model-len", "128",
               "--max-num-batched-tokens", "64", "--num-gpu-blocks-override", "64"])
    lines = capsys.readouterr().err.splitlines()  # (other tests' logging handlers may add lines)
    assert rc == 2 and any(ln.startswith("error: a compiled step ran out of device memory") for ln in lines)
    assert not any("StepOutOfMemoryError" in ln for ln in lines)  # printed, not raised


def test_a_compiled_step_that_will_not_fit_shrinks_the_cache_before_it_runs(monkeypatch, tmp_path, oracle):
    """The threaded precompile reads every compiled step's and sampler's temporaries; when the
    largest is more than the device's largest free block (the allocator's figure, faked here: the
    CPU reports none), the cache gives memory back before any step runs (on a GPU this saves the
    allocator's ~40 s of retries before the out-of-memory error)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reports, ran, stats = [], [], []
    report, forward = warmup.Warmup._report_step_temps, ModelRunner._forward

    def recorded_report(self, jobs, compiled, samplers=()):
        need = max([warmup._temp_bytes(c) for c in compiled] + [b for b, _ in samplers])
        stats.append(need)
        lacks = report(self, jobs, compiled, samplers)
        reports.append((self.num_blocks, len(ran), lacks, need))
        return lacks

    def fragmented_once(self):  # the first pass: a largest free block 32 MiB short of the need
        return {"largest_free_block_bytes": max(0, stats[0] - (32 << 20)) if len(stats) == 1 else 1 << 40}

    def counting_forward(self, *a, **k):
        ran.append(self.num_blocks)
        return forward(self, *a, **k)

    monkeypatch.setattr(warmup.Warmup, "_report_step_temps", recorded_report)
    monkeypatch.setattr(warmup.Warmup, "_device_memory_stats", fragmented_once)
    monkeypatch.setattr(ModelRunner, "_forward", counting_forward)
    try:  # the threaded precompile needs the persistent compilation cache
        llm = LLM(cpu_kv_cache_gib=0.5, compilation_cache_dir=str(tmp_path), **KW)
        runner = llm.llm_engine.runner
        (before, ran_before, lacks, need), (after, _, lacks_after, _) = reports
        assert ran_before == 0  # nothing ran before the give-back
        assert need > 0 and lacks == min(need, 32 << 20) and lacks_after == 0
        assert after == runner.num_blocks and before - after >= 0.05 * before
        assert (before - after) * runner.kv_spec.bytes_per_block >= lacks
        assert set(ran) == {after}  # every warm-up step ran on the smaller cache
        assert llm.llm_engine.scheduler.kv.pool.num_blocks == runner.num_blocks
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params)] == oracle
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
