"""The GEMM probe scripts' Pallas kernels (scripts/bench_fp8_gemv.py, scripts/bench_mlp_fusion.py)
in interpret mode against the arithmetic they replace, so the probes still run when a GPU is lent."""
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bench_fp8_gemv  # noqa: E402
import bench_mlp_fusion  # noqa: E402

from jaxserve.models import quant  # noqa: E402


@pytest.mark.parametrize("rows,splits,swap", [(1, 1, False), (5, 2, False), (20, 4, False), (5, 2, True)])
def test_weight_only_gemv_matches_quant_linear(rows, splits, swap):
    k1, k2 = jax.random.split(jax.random.PRNGKey(rows))
    qw = quant.quantize_weight(jax.random.normal(k1, (512, 2, 64), jnp.float32) * 0.02)
    x = jax.random.normal(k2, (rows, 512), jnp.float32)
    got = bench_fp8_gemv.gemv(x, qw, bn=32, bk=64, splits=splits, warps=4, stages=2, swap=swap, interpret=True)
    want = quant.linear(x, qw)  # <= WEIGHT_ONLY_MAX_ROWS rows: the weight-only path
    assert got.shape == want.shape == (rows, 2, 64)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5 * float(jnp.abs(want).max()))


def test_fused_gate_up_and_chunked_mlp_match_xla():
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    h = jax.random.normal(k1, (64, 256), jnp.float32)
    w = jax.random.normal(k2, (256, 2, 128), jnp.float32) * 0.05
    wd = jax.random.normal(k3, (128, 256), jnp.float32) * 0.05
    want = bench_mlp_fusion.xla_gate_up(h, w)
    got = bench_mlp_fusion.fused_gate_up(h, w, bm=32, bn=64, bk=64, warps=4, stages=2, interpret=True)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
    full = want @ wd
    chunked = bench_mlp_fusion.chunked_mlp(h, w, wd, rows=16)
    np.testing.assert_allclose(np.asarray(chunked), np.asarray(full), rtol=1e-5, atol=1e-4)


def test_int4_stream_variants_agree():
    """scripts/bench_int4_decode_stream.py's three 4-bit products (uint4 widened, the words widened
    in XLA ops, the Pallas kernel: interpret mode here) give the product of the widened weight."""
    import bench_int4_decode_stream as s4

    from jaxserve.models import int4

    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    qw = int4.quantize(jax.random.normal(k1, (512, 128), jnp.float32) * 0.02, group=128)
    x = jax.random.normal(k2, (3, 512), jnp.float32)
    want = np.asarray(x, np.float64) @ np.asarray(int4.dequantize(qw), np.float64)
    pallas = [s4.lin_pallas(s4.CONFIGS[0] + (lay,))(x, qw, "wq") for lay in ("default", "planes", "rows")]
    others = [s4.lin_xla_planes(x, qw, "wq"), s4.lin_widen(s4.WIDEN_CONFIGS[1])(x, qw, "wq")]
    for got in [s4.lin_dequant(x, s4.to_u4(qw), "wq"), s4.lin_xla(x, qw, "wq")] + pallas + others:
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())


def test_mosaic_int4_probe_lowers_for_cuda():
    """scripts/bench_int4_mgpu_probe.py's kernel (4-bit weights as wgmma's register operand, with and
    without group scales) still traces and lowers for CUDA: Mosaic GPU's layout inference runs in
    Python, so a change that breaks the probe's program fails here, not on the next lent GPU."""
    import bench_int4_mgpu_probe as probe

    w = jax.ShapeDtypeStruct((256, 512), jnp.int4)
    x = jax.ShapeDtypeStruct((16, 512), jnp.bfloat16)
    sb = jax.ShapeDtypeStruct((2, 4, 256), jnp.bfloat16)
    for args in ((w, x), (w, x, sb)):
        text = jax.jit(probe.mixed).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
        assert "mosaic_gpu" in text


def test_mosaic_int4_bench_configs_are_valid_and_lower_for_cuda():
    """scripts/bench_int4_decode_stream.py's and scripts/bench_int4_shapes.py's Mosaic-GPU kernel
    configurations: every one cuts every projection's K validly and is one the kernel accepts; the
    stream's product lowers for CUDA (the kernel itself: tests/pallas_kernels/test_int4_mgpu.py)."""
    import bench_int4_decode_stream as s4
    import bench_int4_shapes as shapes

    from pallas_kernels.int4_matmul import mgpu

    for tk, stages, fill, wgs, load in shapes.MGPU:
        assert wgs in mgpu.WARPGROUPS and load in mgpu.LOADS and stages >= 2
        for k, n in shapes.SHAPES.values():  # (the bench skips shapes a warpgroup count does not take)
            sp = mgpu.default_splits(n, k, k // 128, 132, tk, fill, wgs)
            assert mgpu.valid_split(k, k // 128, sp, tk)
            assert mgpu.supported(16, k, n, k // 128, wgs) or n % (mgpu.ROWS_PER_WG * wgs)
    assert all(mgpu.supported(16, k, n, k // 128, 2) for k, n in shapes.SHAPES.values())
    w = {"wq": jax.ShapeDtypeStruct((4096, 4096), jnp.int4), "zs": jax.ShapeDtypeStruct((2, 32, 4096), jnp.bfloat16)}
    x = jax.ShapeDtypeStruct((16, 4096), jnp.bfloat16)
    for cfg in s4.MGPU_CONFIGS:
        lowered = jax.jit(lambda x, w, cfg=cfg: s4.lin_mgpu(cfg)(x, w, "wo")).trace(x, w).lower(
            lowering_platforms=("cuda",))
        assert "mosaic_gpu" in lowered.as_text()
