"""pallas_kernels/int4_matmul/mgpu.py: the Mosaic-GPU 4-bit kernel compiles only for a Hopper GPU
(wgmma with its A operand in registers, which Mosaic GPU's interpreter does not run). On the CPU:
the layout conversion against the contract (exact), the K slicing rules, and the kernel traced and
lowered for CUDA at the engine's shapes, and widen.widen_rows (large steps from this layout) bit for
bit against widen.widen; on a Hopper GPU: the kernel against the XLA reference."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int4_matmul import reference as ref
from pallas_kernels.int4_matmul.mgpu import (MAX_ROWS, default_splits, int4_matmul_rows, load_order, quads, reference,
                                             to_rows, valid_split)
from pallas_kernels.int4_matmul.widen import widen, widen_rows

HOPPER = jax.devices()[0].platform == "gpu" and str(getattr(jax.devices()[0], "compute_capability", "")) == "9.0"


def _case(m, k, n, g, seed, dtype=jnp.bfloat16):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (k, n))
    s = jnp.asarray(rng.uniform(0.001, 0.01, (k // g, n)), dtype)
    z = jnp.asarray(rng.integers(0, 16, (k // g, n)), dtype)
    x = jnp.asarray(rng.standard_normal((m, k)), dtype)
    return x, jnp.asarray(ref.pack(q)), s, z


@pytest.mark.parametrize("g", [128, 256])
def test_to_rows_holds_the_contracts_weight(g):
    """(wq - (z - 8)) * s in the activations' dtype, per group: bit-equal to the reference's widening."""
    _, words, s, z = _case(1, 512, 48, g, g)
    wq, zs = to_rows(words, s, z)
    assert wq.shape == (48, 512) and wq.dtype == jnp.int4 and zs.shape == (2, 512 // g, 48)
    v = wq.astype(jnp.int32)
    assert int(v.min()) >= -8 and int(v.max()) <= 7
    rep = lambda a: jnp.repeat(a, g, axis=0).T  # noqa: E731 ([K/G, N] -> [N, K])
    mine = (v.astype(s.dtype) - rep(zs[0])) * rep(zs[1])
    want = ref.dequantize(words, s, z, s.dtype).T
    assert np.array_equal(np.asarray(mine, np.float32), np.asarray(want, np.float32))


def test_quads_puts_each_threads_wgmma_pairs_in_one_word():
    """quads() is its own inverse, and in its order the 8 values that Mosaic GPU's WGMMA_UPCAST_4X
    layout gives a thread (row 16 w + 8 h + lane // 4, stored inputs 32 q + 8 (lane % 4) + 0..7)
    are, pair k, the pair wgmma's register layout wants in its register (4 q + k, h): inputs
    8 (4 q + k) + 2 (lane % 4) + 0..1 of that row (PTX ISA, wgmma register fragments)."""
    _, words, s, z = _case(1, 256, 128, 128, 5)
    wq, zs = to_rows(words, s, z)
    stored, zs_q = to_rows(words, s, z, order="quads")
    assert np.array_equal(np.asarray(zs, np.float32), np.asarray(zs_q, np.float32))
    assert np.array_equal(np.asarray(quads(stored), np.int8), np.asarray(wq, np.int8))
    assert not np.array_equal(np.asarray(stored, np.int8), np.asarray(wq, np.int8))
    w, st = np.asarray(wq, np.int8), np.asarray(stored, np.int8)
    for tile in range(2):  # rows 0-63 and 64-127, inputs 128 t .. 128 t + 127
        for warp, lane, h, q in np.ndindex(4, 32, 2, 4):
            row, l, c0 = 64 * tile + 16 * warp + 8 * h + lane // 4, lane % 4, 128 * tile
            loaded = st[row, c0 + 32 * q + 8 * l: c0 + 32 * q + 8 * l + 8]
            for k in range(4):
                c8 = 4 * q + k
                assert np.array_equal(loaded[2 * k: 2 * k + 2], w[row, c0 + 8 * c8 + 2 * l: c0 + 8 * c8 + 2 * l + 2])
    x = jnp.asarray(np.random.default_rng(1).standard_normal((3, 256)), jnp.bfloat16)
    assert np.array_equal(np.asarray(reference(x, stored, zs, order="quads"), np.float32),
                          np.asarray(reference(x, wq, zs), np.float32))
    with pytest.raises(ValueError, match="order"):
        to_rows(words, s, z, order="sideways")


def test_to_rows_flattens_fused_outputs():
    _, words, s, z = _case(1, 256, 64, 128, 3)
    flat = to_rows(words, s, z)
    fused = to_rows(words.reshape(32, 2, 32), s.reshape(2, 2, 32), z.reshape(2, 2, 32))
    assert all(np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32)) for a, b in zip(flat, fused))


def test_k_slices_hold_whole_groups_or_lie_inside_one():
    assert valid_split(4096, 32, 8) and valid_split(4096, 32, 32)  # 4 groups; one group per slice
    assert valid_split(4096, 16, 32)  # 128-input slices inside groups of 256
    assert not valid_split(4096, 32, 3) and not valid_split(4096, 32, 64)  # uneven; 64-input slices
    assert not valid_split(4096, 8, 12)  # no: 4096 / 12 is not a whole number of inputs
    assert not valid_split(3 * 1024, 3, 2)  # 1,536-input slices cut a 1,024-input group
    # the fewest slices that give each of 132 SMs work, and every result is valid
    for n, k, groups in ((4096, 4096, 32), (6144, 4096, 32), (4096, 14336, 112), (28672, 4096, 32)):
        sp = default_splits(n, k, groups, 132)
        assert valid_split(k, groups, sp)
        assert (n // 128) * sp >= 132 or sp == max(s for s in range(1, k // 128 + 1) if valid_split(k, groups, s))
        assert all((n // 128) * s < 132 for s in range(1, sp) if valid_split(k, groups, s))


def test_shapes_it_refuses_are_explained():
    x, words, s, z = _case(4, 256, 100, 128, 0)
    wq, zs = to_rows(words, s, z)
    with pytest.raises(ValueError, match="N % 128"):
        int4_matmul_rows(x, wq, zs, num_sms=132)
    x, words, s, z = _case(MAX_ROWS + 1, 256, 128, 128, 0)
    with pytest.raises(ValueError, match="rows"):
        int4_matmul_rows(x, *to_rows(words, s, z), num_sms=132)
    x, words, s, z = _case(8, 512, 128, 128, 0)
    with pytest.raises(ValueError, match="splits=3"):
        int4_matmul_rows(x, *to_rows(words, s, z), splits=3, num_sms=132)
    with pytest.raises(ValueError, match="wgs=4"):
        int4_matmul_rows(x, *to_rows(words, s, z), wgs=4, num_sms=132)


@pytest.mark.parametrize("m,k,n,splits,tk,wgs,load,dtype", [
    (1, 4096, 6144, None, 128, 2, "wgmma", jnp.bfloat16), (16, 4096, 4096, None, 256, 2, "wgmma", jnp.bfloat16),
    (64, 14336, 4096, None, 512, 2, "wgmma", jnp.bfloat16), (256, 4096, 28672, 1, 128, 2, "wgmma", jnp.bfloat16),
    (16, 4096, 6144, None, 256, 3, "wgmma", jnp.bfloat16), (16, 4096, 4096, None, 256, 2, "upcast4x", jnp.bfloat16),
    (1, 4096, 6144, None, 256, 3, "quads", jnp.bfloat16), (16, 14336, 4096, None, 512, 2, "quads_zs", jnp.bfloat16),
    (8, 4096, 4096, None, 256, 2, "quads_zs", jnp.float16)])
def test_kernel_lowers_for_cuda(m, k, n, splits, tk, wgs, load, dtype):
    x = jax.ShapeDtypeStruct((m, k), dtype)
    wq = jax.ShapeDtypeStruct((n, k), jnp.int4)
    zs = jax.ShapeDtypeStruct((2, k // 128, n), dtype)
    f = functools.partial(int4_matmul_rows, splits=splits, tk=tk, wgs=wgs, load=load, num_sms=132)
    assert "mosaic_gpu" in jax.jit(f).trace(x, wq, zs).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="Mosaic GPU's wgmma needs a Hopper GPU")
@pytest.mark.parametrize("m,k,n,g,splits,tk,wgs,load,dtype", [
    (1, 4096, 6144, 128, None, 128, 2, "wgmma", jnp.bfloat16), (5, 512, 256, 128, 1, 128, 2, "wgmma", jnp.bfloat16),
    (16, 4096, 4096, 128, None, 128, 2, "wgmma", jnp.bfloat16), (37, 1024, 384, 256, 2, 128, 2, "wgmma", jnp.bfloat16),
    (64, 14336, 4096, 128, None, 128, 2, "wgmma", jnp.bfloat16), (8, 2048, 128, 1024, 16, 128, 2, "wgmma", jnp.bfloat16),
    (256, 512, 256, 128, 4, 128, 2, "wgmma", jnp.bfloat16), (1, 4096, 4096, 128, 4, 256, 2, "wgmma", jnp.bfloat16),
    (16, 14336, 4096, 128, 4, 256, 2, "wgmma", jnp.bfloat16), (24, 2048, 256, 256, 2, 512, 2, "wgmma", jnp.bfloat16),
    (3, 2048, 384, 1024, 4, 256, 2, "wgmma", jnp.bfloat16), (16, 4096, 6144, 128, None, 256, 3, "wgmma", jnp.bfloat16),
    (1, 4096, 6144, 128, 2, 256, 3, "wgmma", jnp.bfloat16), (16, 4096, 4096, 128, None, 256, 2, "upcast4x", jnp.bfloat16),
    (37, 1024, 384, 256, 2, 512, 2, "upcast4x", jnp.bfloat16), (1, 4096, 6144, 128, None, 256, 3, "quads", jnp.bfloat16),
    (16, 14336, 4096, 128, None, 512, 2, "quads", jnp.bfloat16), (37, 1024, 384, 256, 2, 512, 2, "quads", jnp.bfloat16),
    (1, 4096, 6144, 128, None, 256, 3, "quads_zs", jnp.bfloat16), (64, 14336, 4096, 128, None, 512, 2, "quads_zs", jnp.bfloat16),
    (8, 2048, 128, 1024, 16, 128, 2, "quads_zs", jnp.bfloat16), (5, 512, 256, 128, 1, 128, 2, "quads_zs", jnp.float16)])
def test_kernel_matches_the_reference_on_hopper(m, k, n, g, splits, tk, wgs, load, dtype):
    x, words, s, z = _case(m, k, n, g, m * 7 + n, dtype)
    want = np.asarray(ref.int4_matmul_reference(x, words, s, z), np.float32)
    f = jax.jit(functools.partial(int4_matmul_rows, splits=splits, tk=tk, wgs=wgs, load=load))
    got = np.asarray(f(x, *to_rows(words, s, z, order=load_order(load))), np.float32)
    assert got.shape == (m, n)
    # same widened weights; float32 sums in another order, then one bf16 rounding each
    assert np.abs(got - want).max() <= 2 ** -7 * np.abs(want).max()


@pytest.mark.parametrize("k,n,g,dtype,order", [(256, 64, 128, jnp.bfloat16, "rows"), (512, 96, 256, jnp.float16, "rows"),
                                                (256, 32, 128, jnp.float32, "rows"), (512, 64, 128, jnp.bfloat16, "quads"),
                                                (256, 32, 256, jnp.float16, "quads")])
def test_widen_rows_equals_widen_of_the_words(k, n, g, dtype, order):
    """Large steps of weights kept in this layout: widen.widen_rows (interpret mode here) writes the
    same [K/8, 8, N] bits as widen.widen of the words they came from, which are the reference's."""
    _, words, s, z = _case(1, k, n, g, k + n, dtype)
    want = widen(words, s, z, dtype=dtype, bn=32)
    got = widen_rows(*to_rows(words, s, z, order=order), bn=32, order=order)
    assert got.shape == want.shape and np.array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert np.array_equal(np.asarray(got.reshape(k, n), np.float32), np.asarray(ref.dequantize(words, s, z, dtype),
                                                                                 np.float32))


@pytest.mark.parametrize("order", ["rows", "quads"])
def test_widen_rows_lowers_for_cuda(order):
    wq = jax.ShapeDtypeStruct((6144, 4096), jnp.int4)
    zs = jax.ShapeDtypeStruct((2, 32, 6144), jnp.bfloat16)
    f = functools.partial(widen_rows, interpret=False, asm=True, order=order)
    assert "triton" in jax.jit(f).trace(wq, zs).lower(lowering_platforms=("cuda",)).as_text().lower()


@pytest.mark.gpu
@pytest.mark.skipif(not HOPPER, reason="checked with the kernel's own GPU tests")
@pytest.mark.parametrize("order", ["rows", "quads"])
def test_widen_rows_on_the_gpu_equals_widen(order):
    _, words, s, z = _case(1, 4096, 6144, 128, 11)
    got = widen_rows(*to_rows(words, s, z, order=order), order=order)
    assert np.array_equal(np.asarray(got, np.float32), np.asarray(widen(words, s, z, dtype=s.dtype), np.float32))
