"""pallas_kernels/int4_matmul in interpret mode (CPU in CI; compiled on a GPU) against a float64
numpy oracle of the packing contract, and its XLA reference against the same oracle."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.int4_matmul import reference as ref
from pallas_kernels.int4_matmul.kernel import default_config, int4_matmul, plane_asm_code, supported


def _case(m, k, n, g, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 16, (k, n))
    s = rng.uniform(0.001, 0.01, (k // g, n)).astype(np.float32)
    z = rng.integers(0, 16, (k // g, n)).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32)
    w = (q - np.repeat(z, g, 0)) * np.repeat(s, g, 0)  # the contract, written out
    return q, s, z, x, w


def test_pack_is_the_contracts_bit_layout():
    q = np.random.default_rng(0).integers(0, 16, (64, 24))
    words = ref.pack(q).view(np.uint32)
    for r in (0, 8, 63):
        assert all(((words[r // 8] >> (4 * (r % 8))) & 0xF) == q[r])
    assert np.array_equal(np.asarray(ref.unpack(jnp.asarray(ref.pack(q)))), q)


@pytest.mark.parametrize("m,k,n,g,splits", [(1, 512, 64, 128, None), (5, 1024, 96, 128, 2), (16, 512, 32, 512, None),
                                             (33, 768, 64, 256, 1), (16, 1024, 128, 1024, None), (64, 512, 128, 128, 4)])
def test_kernel_and_reference_match_float64(m, k, n, g, splits):
    q, s, z, x, w = _case(m, k, n, g, m + k)
    want = x.astype(np.float64) @ w.astype(np.float64)
    args = (jnp.asarray(x), jnp.asarray(ref.pack(q)), jnp.asarray(s), jnp.asarray(z))
    with jax.default_matmul_precision("highest"):  # float32 products on a GPU default to TF32
        got = np.asarray(int4_matmul(*args, splits=splits, interpret=True))
        xla = np.asarray(ref.int4_matmul_reference(*args))
    scale = np.abs(want).max()
    assert got.shape == (m, n)
    assert np.abs(got - want).max() < 1e-5 * scale
    assert np.abs(xla - want).max() < 1e-5 * scale


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("layout", ["planes", "rows"])
@pytest.mark.parametrize("convert", ["magic", "offset"])
def test_16_bit_activations_every_variant(dtype, layout, convert):
    """The widening by the float's bits (with 2^m subtracted or folded into the zero point) in
    both layouts: within the 16-bit rounding of the activations and scales."""
    q, s, z, x, _ = _case(16, 512, 64, 128, 7)
    xd, sd, zd = jnp.asarray(x).astype(dtype), jnp.asarray(s).astype(dtype), jnp.asarray(z).astype(dtype)
    w = (q - np.repeat(np.asarray(zd, np.float64), 128, 0)) * np.repeat(np.asarray(sd, np.float64), 128, 0)
    want = np.asarray(xd, np.float64) @ w
    got = np.asarray(int4_matmul(xd, jnp.asarray(ref.pack(q)), sd, zd, layout=layout, convert=convert,
                                 interpret=True), np.float64)
    assert got.dtype == np.float64 and np.abs(got - want).max() < 1e-2 * np.abs(want).max()


def test_configs_and_refusals():
    assert supported(4096, 4096, 32) and not supported(576, 576, 9) and not supported(512, 48, 4)
    assert default_config(1, 4096, 4096, 32)["layout"] == "planes"
    assert default_config(64, 4096, 4096, 32)["layout"] == "rows"
    # k / v of Llama-3-8B: 8 column programs, K split to fill the GPU while a split keeps whole
    # groups and at least 512 inputs
    cfg = default_config(16, 4096, 1024, 32)
    assert cfg["bn"] == 256 and cfg["splits"] == 8 and cfg["asm"]
    assert default_config(16, 4096, 28672, 32)["splits"] == 2  # gate_up: 224 column tiles of 128
    assert default_config(32, 4096, 1024, 32)["bn"] == 128 and default_config(16, 4096, 96, 32)["bn"] == 32
    with pytest.raises(ValueError, match="must divide"):
        int4_matmul(jnp.zeros((1, 512)), jnp.zeros((64, 64), jnp.int32), jnp.zeros((4, 64)), jnp.zeros((4, 64)), bn=128)
    with pytest.raises(ValueError, match="not supported"):
        int4_matmul(jnp.zeros((1, 576)), jnp.zeros((72, 64), jnp.int32), jnp.zeros((9, 64)), jnp.zeros((9, 64)))


def _run_ptx(code: str, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The few PTX instructions plane_asm_code uses, on uint32 arrays: $1 = a, $2 = b -> $0."""
    regs = {"$1": a.astype(np.uint32), "$2": b.astype(np.uint32)}
    val = lambda t: regs[t] if t in regs else np.uint32(int(t))  # noqa: E731
    body = code.strip().strip("{}").split(";")
    for ins in (i.strip() for i in body if i.strip()):
        op, args = ins.split(None, 1)
        args = [t.strip() for t in args.split(",")]
        if op == ".reg":
            continue
        d, srcs = args[0], [val(t) for t in args[1:]]
        if op == "mov.b32":
            regs[d] = srcs[0]
        elif op == "shr.u32":
            regs[d] = srcs[0] >> srcs[1]
        elif op == "shl.b32":
            regs[d] = (srcs[0].astype(np.uint64) << np.uint64(srcs[1])).astype(np.uint32)
        elif op == "lop3.b32":
            x, y, z, lut = srcs
            assert int(lut) == 0xEA  # (a & b) | c
            regs[d] = (x & y) | z
        else:
            raise AssertionError(f"unexpected instruction {op}")
    return regs["$0"]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_inline_ptx_widening_gives_each_plane_of_two_words(dtype):
    """The PTX the kernel runs on a GPU (compiled only there), executed instruction by instruction:
    for every plane i the register holds 2^m + nibble i of the first word in its low half and of the
    second in its high half, as 16-bit floats."""
    rng = np.random.default_rng(3)
    a, b = rng.integers(0, 2**32, (2, 256), dtype=np.uint64).astype(np.uint32)
    base = {jnp.bfloat16: 128.0, jnp.float16: 1024.0}[dtype]
    for i in range(8):
        out = _run_ptx(plane_asm_code(i, dtype), a, b)
        lo = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray((out & 0xFFFF).astype(np.uint16)), dtype), np.float64)
        hi = np.asarray(jax.lax.bitcast_convert_type(jnp.asarray((out >> 16).astype(np.uint16)), dtype), np.float64)
        assert np.array_equal(lo - base, (a >> (4 * i)) & 0xF) and np.array_equal(hi - base, (b >> (4 * i)) & 0xF)


@pytest.mark.skipif(jax.devices()[0].platform != "gpu", reason="the compiled kernel (inline PTX) needs a GPU")
@pytest.mark.parametrize("m", [1, 16, 32, 64])
def test_compiled_kernel_every_default_config(m):
    """On a GPU: the default configuration (inline-PTX widening up to 32 rows) against the
    float64 oracle and against the jnp widening, which must agree bit for bit."""
    q, s, z, x, _ = _case(m, 4096, 1024, 128, m)
    xd, sd, zd = (jnp.asarray(v).astype(jnp.bfloat16) for v in (x, s, z))
    w = (q - np.repeat(np.asarray(zd, np.float64), 128, 0)) * np.repeat(np.asarray(sd, np.float64), 128, 0)
    want = np.asarray(xd, np.float64) @ w
    qw = jnp.asarray(ref.pack(q))
    got = np.asarray(int4_matmul(xd, qw, sd, zd), np.float64)
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    if default_config(m, 4096, 1024, 32)["asm"]:
        plain = np.asarray(int4_matmul(xd, qw, sd, zd, asm=False), np.float64)
        assert np.array_equal(got, plain)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("k,n,g", [(512, 64, 128), (1024, 96, 256), (512, 128, 512)])
def test_widening_pass_writes_the_reference_weight_exactly(k, n, g, dtype):
    """widen.py (interpret mode here; inline PTX on a GPU) writes the reference's widened weight bit
    for bit, in its own row order, for groups of 128 to K inputs; widen_matmul is its product."""
    from pallas_kernels.int4_matmul.widen import widen, widen_matmul

    q, s, z, x, _ = _case(3, k, n, g, k + n)
    qw, sd, zd, xd = jnp.asarray(ref.pack(q)), jnp.asarray(s).astype(dtype), jnp.asarray(z).astype(dtype), \
        jnp.asarray(x).astype(dtype)
    got = widen(qw, sd, zd, dtype=dtype).reshape(k, n)
    assert got.dtype == dtype and np.array_equal(np.asarray(got), np.asarray(ref.dequantize(qw, sd, zd, dtype)))
    with jax.default_matmul_precision("highest"):
        np.testing.assert_array_equal(np.asarray(widen_matmul(xd, qw, sd, zd)),
                                      np.asarray(ref.int4_matmul_reference(xd, qw, sd, zd)))
    with pytest.raises(ValueError, match="must divide"):
        widen(qw, sd, zd, dtype=dtype, bn=512 if n % 512 else 1024)
