"""The parallel warm-up (the default on GPUs, where the persistent compilation cache is on):
steps, sampler variants, prompt-logprob heads and the async token feeds are compiled on threads
into the cache, the ordered warm-up then loads them (no cache miss after the threads are done),
and serving compiles nothing."""
import logging
import re

import jax

from jaxserve import LLM, SamplingParams
from jaxserve.runner.model_runner import ModelRunner


class _Misses(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.after_threads = False
        self.late = []  # persistent-cache misses once the threaded precompile has finished

    def emit(self, record):
        m = re.search(r"CACHE MISS for '(\w+)'", record.getMessage())
        if m and self.after_threads:
            self.late.append(m.group(1))


def test_parallel_warmup_precompiles_steps_sampler_and_heads(tmp_path, monkeypatch):
    handler = _Misses()
    loggers = [logging.getLogger(n) for n in ("jax._src.compiler", "jax._src.compilation_cache")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.DEBUG)
        lg.addHandler(handler)
    original = ModelRunner._precompile

    def precompile_then_watch(self):
        original(self)
        handler.after_threads = True

    monkeypatch.setattr(ModelRunner, "_precompile", precompile_then_watch)
    said = []
    report = logging.Handler(logging.INFO)
    report.emit = lambda r: said.append(r.getMessage())
    jlog = logging.getLogger("jaxserve")
    jlevel = jlog.level
    jlog.setLevel(logging.INFO)
    jlog.addHandler(report)
    old = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)  # cache even tiny programs
    try:
        llm = LLM(model="tiny", load_format="dummy", max_model_len=128, max_num_seqs=8,
                  max_num_batched_tokens=64, compilation_cache_dir=str(tmp_path))
        assert handler.after_threads
        precompiled = ("_stage_fn", "sample_tokens", "sample", "_logits_fn", "feed_rows")
        assert not [n for n in handler.late if n.removeprefix("jit_") in precompiled], handler.late
        runner = llm.llm_engine.runner
        # the threaded precompile reports its largest step: the oracle compiles each bucket again
        temps = {T: runner._stage_jit(0, T).lower(*runner._stage_args(0, runner._dummy_inputs(T), runner._kv(0)))
                 .compile().memory_analysis().temp_size_in_bytes for T in runner.token_buckets}
        top = max(temps, key=lambda T: (temps[T], T))
        line = [m for m in said if "the largest step temporaries" in m]
        assert line and f"at token bucket {top} (stage 0)" in line[0], (line, temps)
        c0 = runner.num_compilations()
        outs = llm.generate([{"prompt_token_ids": [5, 6, 7]}] * 3,
                            [SamplingParams(temperature=0, max_tokens=4),
                             SamplingParams(temperature=0.8, top_k=5, max_tokens=4, logprobs=2),
                             SamplingParams(temperature=1.0, max_tokens=4, prompt_logprobs=1,
                                            presence_penalty=0.5)], use_tqdm=False)
        assert [len(o.outputs[0].token_ids) for o in outs] == [4, 4, 4]
        assert runner.num_compilations() == c0
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", old)
        jax.config.update("jax_compilation_cache_dir", None)
        jlog.removeHandler(report)
        jlog.setLevel(jlevel)
        for lg, lv in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(lv)


def test_a_failed_threaded_compile_falls_back_to_the_ordered_warmup(tmp_path, monkeypatch):
    """The threaded precompile is only an optimization: when a compile on a thread fails (an H200
    once failed to launch ptxas there), warm-up says so, compiles in order, and serves the same
    tokens as an engine warmed up without threads."""
    prompts = [{"prompt_token_ids": [5, 6, 7, 8]}, {"prompt_token_ids": [9, 3]}]
    params = SamplingParams(temperature=0, max_tokens=6)
    kw = dict(model="tiny", load_format="dummy", max_model_len=128, max_num_seqs=4, max_num_batched_tokens=32)
    want = [o.outputs[0].token_ids for o in LLM(**kw).generate(prompts, params, use_tqdm=False)]

    def fail_on_a_thread(self):
        raise jax.errors.JaxRuntimeError("INTERNAL: Failed to launch ptxas")

    monkeypatch.setattr(ModelRunner, "_precompile", fail_on_a_thread)
    said = []
    report = logging.Handler(logging.WARNING)
    report.emit = lambda r: said.append(r.getMessage())
    jlog = logging.getLogger("jaxserve")
    jlog.addHandler(report)
    try:
        llm = LLM(compilation_cache_dir=str(tmp_path), **kw)
    finally:
        jlog.removeHandler(report)
        jax.config.update("jax_compilation_cache_dir", None)
    assert any("Failed to launch ptxas" in m and "in order" in m for m in said), said
    runner = llm.llm_engine.runner
    c0 = runner.num_compilations()
    got = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert runner.num_compilations() == c0
