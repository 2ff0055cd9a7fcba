"""jaxserve.bench.hlo_dots (the products of a compiled program) and profile.op_times (device time
per HLO instruction), which together give each GEMM's rate inside a real engine step."""
import tempfile

import jax
import jax.numpy as jnp

from jaxserve.bench.hlo_dots import dot_rates, dots
from jaxserve.bench.profile import op_times


def _two_products():
    f = jax.jit(lambda x, w, v, b: (jnp.tanh(x @ w) @ v, jnp.einsum("bmk,bkn->bmn", b, b.transpose(0, 2, 1))))
    args = (jnp.ones((48, 64), jnp.bfloat16), jnp.ones((64, 96), jnp.bfloat16), jnp.ones((96, 32), jnp.bfloat16),
            jnp.ones((3, 8, 40), jnp.float32))
    return f.lower(*args).compile(), args


def test_dots_finds_each_product_with_its_shape_and_flops():
    exe, _ = _two_products()
    found = sorted((d.m, d.k, d.n, d.flops) for d in dots(exe.as_text()).values())
    want = sorted([(48, 64, 96, 2 * 48 * 64 * 96), (48, 96, 32, 2 * 48 * 96 * 32), (24, 40, 8, 2 * 3 * 8 * 8 * 40)])
    assert found == want


def test_dots_reads_a_cublas_custom_call():
    # The GPU form: a tuple result (output, workspace), typed operands, contracting dims in the
    # backend config, inside a while body (a scanned layer loop).
    config = ('{"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],'
              '"rhs_contracting_dimensions":["0"]}}}')
    text = "\n".join([
        "HloModule m",
        "",
        "%body (p: (s32[], bf16[256,4096], bf16[4096,6144])) -> (s32[], bf16[256,4096], bf16[4096,6144]) {",
        "  %p = (s32[], bf16[256,4096]{1,0}, bf16[4096,6144]{1,0}) parameter(0)",
        "  %x = bf16[256,4096]{1,0} get-tuple-element(%p), index=1",
        "  %w = bf16[4096,6144]{1,0} get-tuple-element(%p), index=2",
        "  %cublas-gemm.3 = (bf16[256,6144]{1,0}, s8[4194304]{0}) custom-call(bf16[256,4096]{1,0} %x, "
        f'bf16[4096,6144]{{1,0}} %w), custom_call_target="__cublas$gemm", backend_config={config}',
        "  ROOT %t = (s32[], bf16[256,4096]{1,0}, bf16[4096,6144]{1,0}) tuple(%i, %x, %w)",
        "}",
    ])
    d = dots(text)["cublas-gemm.3"]
    assert (d.m, d.k, d.n, d.flops) == (256, 4096, 6144, 2 * 256 * 4096 * 6144)


def test_dot_rates_joins_profiled_time_per_instruction():
    exe, args = _two_products()
    jax.block_until_ready(exe(*args))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(3):
            jax.block_until_ready(exe(*args))
    times = op_times(d, plane_prefix="/host:CPU")  # the CPU client's thunks carry hlo_op too
    names = dots(exe.as_text())
    assert set(names) <= set(times), (names, times)
    assert all(times[n][1] >= 3 for n in names)
    rows = dot_rates(exe.as_text(), times, runs=3)
    assert sorted(r["shape"] for r in rows) == sorted(x.label for x in names.values())
    for r in rows:
        assert r["per_run"] == 1 and r["us_each"] > 0 and r["tflop_per_s"] > 0


def test_host_summary_counts_calls_and_splits_self_time():
    from jaxserve.bench.profile import host_summary

    def outer():  # a traced Python function around 4 jitted calls
        for _ in range(4):
            jax.block_until_ready(f(x))
    f = jax.jit(lambda v: jnp.tanh(v) @ v)
    x = jnp.ones((64, 64), jnp.float32)
    jax.block_until_ready(f(x))
    d = tempfile.mkdtemp()
    with jax.profiler.trace(d):
        for _ in range(2):
            outer()
    s = host_summary(d, per=2, top=500)
    rows = {r["name"]: r for r in s["top_total"]}
    call = next(r for n, r in rows.items() if n.startswith("PjitFunction("))
    assert call["calls"] == 4  # 8 calls over per=2
    py = next(r for n, r in rows.items() if n.endswith(" outer"))
    assert py["calls"] == 1
    # outer's self time excludes what ran nested inside it on the same thread
    assert 0 <= py["self_ms"] < py["ms"] and call["ms"] <= py["ms"]
    assert all(r["self_ms"] <= r["ms"] + 1e-6 for r in s["top_total"])
