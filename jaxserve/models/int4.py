"""4-bit weights in groups (AWQ and GPTQ checkpoints, vLLM's `--quantization awq|gptq`).

Stored layout of one projection of K inputs and N... outputs (the model's [in, out] order):
  {"qw": [K/8, N...] int32, "s": [K/G, N...] scales, "z": [K/G, N...] zero points (0..15)}
with s and z in the model dtype: input row 8r + i is bits 4i..4i+3 of word r (GPTQ's packing,
pallas_kernels/int4_matmul/reference.py) and the weight is (q - z) * s, row k in group k // G. A
fused gate+up [E, 2, F] keeps its output shape on every member. A layer's projections stream a
quarter of their bf16 bytes plus the scales and zeros (2 x 2 bytes per G weights: 3% at G = 128).

`linear` runs steps of up to int4_matmul.MAX_ROWS rows on the GPU through the Pallas kernel (the
words widened in registers); larger steps widen the weight once per step with widen.py's Pallas
pass (the same inline-PTX widening) and run one dot: on an H200 a 32-layer stream at 256 / 1,024
rows took 0.84x / 0.92x the time of XLA's own widening + dot, and 4-bit 128 / 128 and 1024 / 128
ran 1.047x / 1.035x faster (docs/benchmarks.md, 2026-12-01 twelfth session); on a tensor-parallel
mesh both run per shard. The CPU and shapes neither pass takes widen in XLA ops (the reference).
On one Hopper GPU (rows_enabled; `JAXSERVE_INT4_ROWS=0` turns it off) `with_rows` moves every
weight the Mosaic-GPU kernel takes to mgpu.py's layout (wq [N..., K] int4, zs): steps of up to
MAX_ROWS rows run that kernel, larger ones widen.widen_rows + one dot. On an H200, against the words
above in the same call: batch-1 decode 1.13-1.18x, batch 32 1.37x, 128 / 128 and 1024 / 128 0.994x /
0.995x (docs/benchmarks.md, 2026-12-02 fourteenth session).

The checkpoint formats are unpacked on the host, tensor by tensor, and packed into this layout:
  AWQ (AutoAWQ "gemm"): qweight int32 [K, N/8], eight 4-bit columns per word in the order
      AWQ_ORDER (nibble i holds column 8c + AWQ_ORDER[i]); qzeros int32 [K/G, N/8] packed alike;
      scales [K/G, N].
  GPTQ (AutoGPTQ / GPTQModel, checkpoint_format "gptq"): qweight int32 [K/8, N], eight rows per
      word, row 8r + i in nibble i; qzeros int32 [K/G, N/8], column 8c + i in nibble i, stored as
      zero - 1 (format "gptq_v2" stores the zero itself); scales [K/G, N]; g_idx [K], the group of
      each input row. When g_idx is not k // G (act-order, desc_act=true) the groups are not
      contiguous and the projection is dequantized into the model dtype instead (logged).
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Iterator, Optional

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.int4_matmul import mgpu
from pallas_kernels.int4_matmul import reference as ref
from pallas_kernels.int4_matmul.kernel import MAX_ROWS, int4_matmul
from pallas_kernels.int4_matmul.kernel import supported as kernel_supported
from pallas_kernels.int4_matmul.reference import pack
from pallas_kernels.int4_matmul.widen import widen_matmul, widen_rows

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_SHIFTS = np.arange(8, dtype=np.uint32) * 4
METHODS = ("awq", "gptq")


def is_int4(w) -> bool:
    """A 4-bit weight: the words layout {"qw", "s", "z"} or the Mosaic-GPU kernel's {"wq", "zs"} (not a
    layer's dict, whose q projection is also named "wq")."""
    return isinstance(w, dict) and (set(w) == {"qw", "s", "z"} or set(w) == {"wq", "zs"})


# ---- unpacking checkpoint tensors (host, numpy) ---------------------------------------------
def _nibbles(words: np.ndarray) -> np.ndarray:
    """int32 [..., W] -> uint8 [..., W, 8]: nibble i of each word (bits 4i..4i+3)."""
    w = words.astype(np.uint32, copy=False)
    return ((w[..., None] >> _SHIFTS) & 0xF).astype(np.uint8)


def unpack_columns(words: np.ndarray, order=None) -> np.ndarray:
    """int32 [R, N/8] -> uint8 [R, N] where nibble i of word c is column 8c + order[i]
    (order None: 8c + i)."""
    nib = _nibbles(words)  # [R, N/8, 8]
    if order is not None:
        nib = nib[..., list(np.argsort(order))]
    return nib.reshape(words.shape[0], -1)


def from_awq(qweight, qzeros, scales) -> dict:
    """AutoAWQ GEMM tensors -> {"q4" [K, N] uint8, "s" [K/G, N] float32, "z" [K/G, N] float32}."""
    q = unpack_columns(np.asarray(qweight), AWQ_ORDER)
    z = unpack_columns(np.asarray(qzeros), AWQ_ORDER)
    s = np.asarray(scales, dtype=np.float32)
    _check_shapes("AWQ", q, s, z)
    return {"q4": q, "s": s, "z": z.astype(np.float32)}


def from_gptq(qweight, qzeros, scales, g_idx=None, *, zero_offset: int = 1) -> dict:
    """GPTQ tensors -> the same dict, or {"w": [K, N] float32} when g_idx is not k // G
    (act-order: the groups are not contiguous runs of rows). zero_offset: 1 for the "gptq"
    checkpoint format (zeros stored minus one), 0 for "gptq_v2"."""
    q = ref.unpack(np.asarray(qweight, np.int32)).astype(np.uint8)  # GPTQ's packing is the device layout
    z = unpack_columns(np.asarray(qzeros)).astype(np.float32) + zero_offset
    s = np.asarray(scales, dtype=np.float32)
    K, groups = q.shape[0], s.shape[0]
    if g_idx is not None:
        g_idx = np.asarray(g_idx).astype(np.int64)
        if g_idx.shape != (K,) or g_idx.min() < 0 or g_idx.max() >= groups:
            raise ValueError(f"GPTQ g_idx has shape {g_idx.shape} / values outside 0..{groups - 1} for {K} "
                             f"input rows")
        if not np.array_equal(g_idx, np.arange(K) // max(K // groups, 1)):
            return {"w": (q.astype(np.float32) - z[g_idx]) * s[g_idx]}
    _check_shapes("GPTQ", q, s, z)
    return {"q4": q, "s": s, "z": z}


def _check_shapes(fmt, q, s, z):
    K, N = q.shape
    if s.shape[1] != N or z.shape != s.shape or K % s.shape[0]:
        raise ValueError(f"{fmt} tensors do not fit together: weight [{K}, {N}], scales {list(s.shape)}, "
                         f"zeros {list(z.shape)} (expected [{K}/group, {N}] for both)")


# ---- reading a checkpoint (host) ----------------------------------------------------------
@dataclass(frozen=True)
class CheckpointFormat:
    """What a quantized checkpoint's config says about its tensors."""
    method: str  # "awq" | "gptq"
    group_size: int  # -1: one group over the whole input dimension
    zero_offset: int = 0  # GPTQ "gptq" format: zeros stored minus one
    act_order: bool = False  # GPTQ desc_act: groups not contiguous, dequantized on load


@dataclass(frozen=True)
class HostInt4:
    """One projection's 4-bit weight on the host, [in, out] order: q4 [K, N...] uint8 values,
    s, z [K/G, N...] float32."""
    q4: np.ndarray
    s: np.ndarray
    z: np.ndarray

    @property
    def shape(self) -> tuple:
        return tuple(self.q4.shape)

    def map(self, fn) -> "HostInt4":
        return HostInt4(fn(self.q4), fn(self.s), fn(self.z))

    def dequantize(self) -> np.ndarray:
        g = self.q4.shape[0] // self.s.shape[0]
        return (self.q4.astype(np.float32) - np.repeat(self.z, g, 0)) * np.repeat(self.s, g, 0)


def checkpoint_format(cfg: dict, model_dir: Optional[str] = None) -> Optional[CheckpointFormat]:
    """The 4-bit format of an HF checkpoint from config.json's quantization_config (or an older
    AutoAWQ quant_config.json beside it); None for an unquantized checkpoint. Raises ValueError,
    naming what to change, for quantized checkpoints jaxserve cannot read."""
    qc = cfg.get("quantization_config")
    if qc is None and model_dir is not None and os.path.isfile(os.path.join(model_dir, "quant_config.json")):
        with open(os.path.join(model_dir, "quant_config.json")) as f:
            qc = dict(json.load(f), quant_method="awq")
    if not qc:
        return None
    method = str(qc.get("quant_method", "")).lower()
    if method not in METHODS:
        raise ValueError(f"the checkpoint is quantized with {method or 'an unnamed method'!r}; jaxserve reads "
                         f"AWQ and GPTQ 4-bit checkpoints (and makes float8 itself from an unquantized one with "
                         f"quantization='fp8')")
    bits = int(qc.get("bits", qc.get("w_bit", 4)))
    if bits != 4:
        raise ValueError(f"this {method.upper()} checkpoint has {bits}-bit weights; jaxserve reads 4-bit ones only")
    group = int(qc.get("group_size", qc.get("q_group_size", 128)))
    if method == "awq":
        version = str(qc.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"AWQ version {version!r} is not supported; jaxserve reads AutoAWQ's 'gemm' layout")
        if not qc.get("zero_point", True):
            raise ValueError("AWQ without zero points (zero_point=false) is not supported")
        return CheckpointFormat("awq", group)
    fmt = str(qc.get("checkpoint_format", "gptq")).lower()
    if fmt not in ("gptq", "gptq_v2") or qc.get("is_marlin_format"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported; jaxserve reads 'gptq' and 'gptq_v2'")
    return CheckpointFormat("gptq", group, zero_offset=1 if fmt == "gptq" else 0,
                            act_order=bool(qc.get("desc_act", False)))


_PARTS = ("qweight", "qzeros", "scales", "g_idx")


def checkpoint_tensors(tensors: Iterator[tuple[str, np.ndarray]], fmt: CheckpointFormat) -> Iterator[tuple]:
    """A quantized checkpoint's tensor stream -> (name, array or HostInt4): each projection's
    qweight / qzeros / scales (/ g_idx) become one HostInt4 under "<module>.weight" once all have
    arrived (act-order GPTQ: a float32 array in HF's [out, in] order instead); other tensors pass
    through. Without act order GPTQ's g_idx is k // G and is not needed."""
    need = {"qweight", "qzeros", "scales"} | ({"g_idx"} if fmt.act_order else set())
    pending: dict[str, dict] = {}
    for name, arr in tensors:
        module, _, part = name.rpartition(".")
        if part not in _PARTS:
            yield name, arr
            continue
        if part == "g_idx" and not fmt.act_order:
            continue
        got = pending.setdefault(module, {})
        got[part] = arr
        if not need <= got.keys():
            continue
        del pending[module]
        try:
            if fmt.method == "awq":
                d = from_awq(got["qweight"], got["qzeros"], got["scales"])
            else:
                d = from_gptq(got["qweight"], got["qzeros"], got["scales"], got.get("g_idx"),
                              zero_offset=fmt.zero_offset)
        except ValueError as e:
            raise ValueError(f"{module}: {e}") from None
        if "w" in d:
            yield module + ".weight", d["w"].T
        else:
            yield module + ".weight", HostInt4(d["q4"], d["s"], d["z"])
    if pending:
        module, got = next(iter(pending.items()))
        raise ValueError(f"checkpoint has {len(pending)} incomplete quantized projections, e.g. {module} with only "
                         f"{sorted(got)} (needs {sorted(need)})")


# ---- on the device ---------------------------------------------------------------------------
def quantize(w, group: int = 128) -> dict:
    """w [K, N...] -> int4 dict, round to nearest with a zero point per (group, output) (AWQ's
    asymmetric scheme without its activation-aware search): benchmarks' dummy weights and tests."""
    K = w.shape[0]
    if K % group or group % 8:
        raise ValueError(f"input dimension {K} is not a multiple of the group size {group} (itself a multiple of 8)")
    wf = w.astype(jnp.float32).reshape((K // group, group, -1))
    lo, hi = wf.min(axis=1), wf.max(axis=1)  # [K/G, N]
    s = jnp.maximum(hi - lo, 1e-8) / 15.0
    z = jnp.clip(jnp.round(-lo / s), 0, 15)
    q = jnp.clip(jnp.round(wf / s[:, None] + z[:, None]), 0, 15).reshape(K, -1)
    out = w.shape[1:]
    return {"qw": pack(q.astype(jnp.int32)).reshape((K // 8,) + out), "s": s.astype(w.dtype).reshape((-1,) + out),
            "z": z.astype(w.dtype).reshape((-1,) + out)}


def _flat(qw):
    """-> (words [K/8, N], s [K/G, N], z [K/G, N]) with the output dims flattened."""
    return (qw["qw"].reshape(qw["qw"].shape[0], -1), qw["s"].reshape(qw["s"].shape[0], -1),
            qw["z"].reshape(qw["z"].shape[0], -1))


def dequantize(qw) -> jax.Array:
    """int4 dict -> [K, N...] float32 (tests and reference)."""
    words, s, z = _flat(qw)
    return ref.dequantize(words, s, z).reshape((words.shape[0] * 8,) + qw["qw"].shape[1:])


def linear(x, qw, *, kernel: Optional[bool] = None, widen: Optional[bool] = None, mesh=None,
           split: Optional[str] = None):
    """x [T, K] @ int4 weight -> [T, N...] in x's dtype (float32 accumulation). kernel: None picks
    the Pallas kernel on the GPU for steps of at most MAX_ROWS rows whose shape it takes; True /
    False force a path (True on the CPU runs it in interpret mode: tests). widen, for the steps the
    kernel does not run: None picks widen.py's pass on the GPU for weights whose (per-shard) shape it
    takes, else XLA's widening; True / False force one (bit-equal results). On a mesh whose "model"
    axis splits the weight (tensor parallelism), split says how: "col" (output columns: q, k, v,
    gate+up) or "row" (inputs: o, down, whose partial products are summed over the axis); the
    kernel or the widening pass then runs on each device's shard (shard_map). A weight in the
    Mosaic-GPU kernel's layout ({"wq", "zs"}: with_rows) goes to _linear_rows (one device)."""
    if "wq" in qw:
        return _linear_rows(x, qw, kernel=kernel, widen=widen, mesh=mesh)
    words, s, z = _flat(qw)
    k, n, groups = words.shape[0] * 8, words.shape[1], s.shape[0]
    tp = mesh.shape.get("model", 1) if mesh is not None else 1
    if tp > 1 and split not in ("col", "row"):
        raise ValueError(f"a 4-bit product on a tensor-parallel mesh needs split='col' or 'row', got {split!r}")
    local = (k, n // tp, groups) if split == "col" else (k // tp, n, groups // tp) if tp > 1 else (k, n, groups)
    gpu = jax.default_backend() == "gpu"
    if kernel is None:
        kernel = gpu and x.shape[0] <= MAX_ROWS and kernel_supported(*local)
    if kernel and tp > 1:
        return _per_shard(int4_matmul, x, qw, mesh, split)
    if kernel:
        y = int4_matmul(x, words, s, z)
    else:
        # widen this layer's weight only once its input exists: left free, XLA widened many layers'
        # weights at once (8.75 GiB of temporaries in an 8,192-token step of Llama-3-8B on an H200)
        # (the per-shard pass gets the same barrier: it takes the weight's arrays as they are)
        qw = dict(qw)
        qw["qw"], qw["s"], qw["z"], x = jax.lax.optimization_barrier((qw["qw"], qw["s"], qw["z"], x))
        words, s, z = _flat(qw)
        if widen is None:
            widen = gpu and kernel_supported(*local)
        if widen and tp > 1:
            return _per_shard(widen_matmul, x, qw, mesh, split)
        y = widen_matmul(x, words, s, z) if widen else ref.int4_matmul_reference(x, words, s, z)
    return y.reshape((x.shape[0],) + qw["qw"].shape[1:])


ROWS_ENV = "JAXSERVE_INT4_ROWS"  # "0" off; unset / "1" per-shape options (a load name: with that load);
# "tk,stages,fill,wgs[,load]" for all weights
ROWS_DEFAULT = "256,4,one_wave,2"  # the format's example; "1" picks per shape (_rows_defaults)
# The load the per-shape options use: quads_zs (zero point and scale folded into the widening) once
# the engine's host no longer hid the faster products (docs/benchmarks.md, seventeenth session: 4-bit
# batch 1 1.12-1.13x, batch 32 1.07-1.13x over "wgmma" in three calls); `JAXSERVE_INT4_ROWS=wgmma` keeps the old.
DEFAULT_LOAD = "quads_zs"


def _rows_defaults(n: int, k: int, groups: int) -> str:
    """The kernel's options for a weight [N, K] (JAXSERVE_INT4_ROWS unset or 1), from 2026-12-02's sweeps
    (docs/benchmarks.md, fourteenth session, 1 and 16 rows on an H200): 512-input steps in 3 stages
    for the large weights (gate+up 35.2 against 38.9 us; down 17.0 against 17.2), else 256 in 4; 3
    consumer warpgroups where N is a multiple of 192 (Llama-3-8B's fused qkv: 9.5 against 11.3 us;
    first run inside an engine in the fifteenth session: batch 1 and 32 no slower), else 2."""
    tk = _fit_tk(k, groups, 512 if n * k > 32 << 20 else 256)
    return f"{tk},{3 if tk == 512 else 4},one_wave,{3 if n % (3 * mgpu.ROWS_PER_WG) == 0 else 2}"


def _fit_tk(k: int, groups: int, tk: int) -> int:
    """The largest valid pipeline step (mgpu.valid_split over all of K) of at most tk inputs."""
    return next((t for t in (tk, 512, 256) if t <= tk and mgpu.valid_split(k, groups, 1, t)), mgpu.TK)


def rows_config(wq_shape, groups: int) -> dict:
    """mgpu.int4_matmul_rows' options for a weight [N, K] in `groups` groups, from ROWS_ENV. One
    setting for all weights ("tk,stages,fill,wgs[,load]") is fitted to each: 2 warpgroups where N is
    not a multiple of 64 x wgs, the largest valid step of at most tk inputs. A load name alone
    (mgpu.LOADS) takes the per-shape options with that load."""
    n, k = wq_shape
    spec = os.environ.get(ROWS_ENV, "1")
    if spec in ("", "1") or spec in mgpu.LOADS:
        parts = _rows_defaults(n, k, groups).split(",") + [spec if spec in mgpu.LOADS else DEFAULT_LOAD]
    else:
        parts = spec.split(",")
    try:
        tk, stages, fill, wgs, *load = parts
        tk, stages, wgs = int(tk), int(stages), int(wgs)
        if fill not in ("cover", "one_wave") or len(load) > 1 or (load and load[0] not in mgpu.LOADS):
            raise ValueError
    except ValueError:
        raise ValueError(f"{ROWS_ENV}={spec!r}: want 1, a load, or tk,stages,fill,wgs[,load] with fill cover | one_wave "
                         f"and load one of {mgpu.LOADS} (e.g. {ROWS_DEFAULT})") from None
    if n % (mgpu.ROWS_PER_WG * wgs):
        wgs = 2
    tk = _fit_tk(k, groups, tk)
    sms = getattr(jax.devices()[0], "core_count", None) or 132  # an H100's / H200's off the GPU (tests)
    return dict(tk=tk, stages=stages, wgs=wgs, load=load[0] if load else DEFAULT_LOAD,
                splits=mgpu.default_splits(n, k, groups, sms, tk, fill, wgs))


def _linear_rows(x, w, *, kernel: Optional[bool], widen: Optional[bool], mesh):
    """linear() for a weight in mgpu.py's layout, wq [N..., K] int4 and zs [2, K/G, N...]: on a GPU
    steps of at most MAX_ROWS rows run the Mosaic-GPU kernel, larger ones widen.widen_rows + one
    dot; elsewhere (and when forced: kernel / widen False) XLA's widening (mgpu.reference)."""
    if mesh is not None and mesh.shape.get("model", 1) > 1:
        raise ValueError("a 4-bit weight in the Mosaic-GPU kernel's layout (JAXSERVE_INT4_ROWS) runs on one device; "
                         "unset JAXSERVE_INT4_ROWS for tensor parallelism")
    out = w["wq"].shape[:-1]
    k = w["wq"].shape[-1]
    wq, zs = w["wq"].reshape(-1, k), w["zs"].reshape(2, w["zs"].shape[1], -1)
    n, groups = wq.shape[0], zs.shape[1]
    gpu = jax.default_backend() == "gpu"
    cfg = rows_config(wq.shape, groups)
    order = mgpu.load_order(cfg["load"])  # how with_rows stored wq (the same setting picks both)
    if gpu and kernel is not False and x.shape[0] <= MAX_ROWS and mgpu.supported(x.shape[0], k, n, groups, cfg["wgs"]):
        y = mgpu.int4_matmul_rows(x, wq, zs, **cfg)
    else:
        wq, zs, x = jax.lax.optimization_barrier((wq, zs, x))  # widen one layer at a time (linear's note)
        if widen is None:
            widen = gpu and kernel_supported(k, n, groups)
        if widen:
            wd = widen_rows(wq, zs, order=order).reshape(k, n)
            y = jnp.dot(x, wd.astype(x.dtype), preferred_element_type=jnp.float32).astype(x.dtype)
        else:
            y = mgpu.reference(x, wq, zs, order=order)
    return y.reshape((x.shape[0],) + out)


def _hopper() -> bool:
    """The first device is an sm_90 GPU (the kernel's wgmma and TMA: H100, H200, GH200)."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).split(".")[0] == "9"


def rows_enabled(sharded: bool = False) -> bool:
    """4-bit weights go to mgpu.py's layout (with_rows): by default on an unsharded model on a Hopper
    GPU (batch-1 decode 1.13-1.18x, batch 32 1.37x, prefill-heavy work within 0.6% on an H200:
    docs/benchmarks.md, fourteenth session); JAXSERVE_INT4_ROWS=0 keeps the words (and the Triton
    kernel), any other value forces the layout on an unsharded GPU model and picks the options."""
    spec = os.environ.get(ROWS_ENV, "")
    if spec == "0" or sharded or jax.default_backend() != "gpu":
        return False
    return bool(spec) or _hopper()


def layout(params) -> Optional[str]:
    """Which layout a model's 4-bit weights are in: "rows" (mgpu.py's, some or all), "words", or None."""
    found = [("rows" if "wq" in t else "words") for t in jax.tree.leaves(params, is_leaf=is_int4) if is_int4(t)]
    return None if not found else "rows" if "rows" in found else "words"


_to_rows = jax.jit(mgpu.to_rows, static_argnames="order")  # one compile per weight shape and order


def with_rows(params, *, free: bool = False):
    """Every 4-bit weight the Mosaic-GPU kernel takes (mgpu.supported: N a multiple of 128, groups
    of a multiple of 128 inputs) moved to mgpu.py's layout, wq [N..., K] int4 and zs [2, K/G, N...];
    `linear` runs it through that kernel for steps of at most MAX_ROWS rows and through
    widen.widen_rows + a dot above. Other weights keep the words (and the Triton kernel).
    free: delete each weight's words once converted (the engine, after llama.fuse_qkv: the device
    then holds one layout plus one weight's other, not both: Llama-3-70B's 37 GB twice would not fit
    an H100)."""
    def visit(t):
        if is_int4(t) and "qw" in t and mgpu.supported(1, t["qw"].shape[0] * 8, math.prod(t["qw"].shape[1:]),
                                                       t["s"].shape[0]):
            out = t["qw"].shape[1:]
            order = mgpu.load_order(rows_config((math.prod(out), t["qw"].shape[0] * 8), t["s"].shape[0])["load"])
            wq, zs = _to_rows(t["qw"], t["s"], t["z"], order=order)
            if free:  # (the runtime keeps a buffer until the conversion that reads it is done)
                for a in (t["qw"], t["s"], t["z"]):
                    a.delete()
            return {"wq": wq.reshape(out + (wq.shape[1],)), "zs": zs.reshape((2, zs.shape[1]) + out)}
        if isinstance(t, dict):
            return {k: visit(v) for k, v in t.items()}
        if isinstance(t, (list, tuple)):
            return type(t)(visit(v) for v in t)
        return t
    return visit(params)


def _per_shard(product, x, qw, mesh, split: str):
    """product (the kernel, or widen.py + dot) on each "model" shard: column shards give their own
    output columns; row shards give partial products of their inputs, summed over the axis (psum)."""
    from jax.sharding import PartitionSpec as P

    nd = qw["qw"].ndim  # 2, or 3 for gate+up [E/8, 2, F]
    if split == "col":
        w_spec, x_spec = P(*([None] * (nd - 1)), "model"), P()
        out_spec = w_spec  # [T, N...]: the same rank as the words [K/8, N...], split on the last axis
    else:
        w_spec, x_spec, out_spec = P("model", *([None] * (nd - 1))), P(None, "model"), P()

    def shard(x, words, s, z):
        y = product(x, words.reshape(words.shape[0], -1), s.reshape(s.shape[0], -1), z.reshape(z.shape[0], -1))
        y = y.reshape((x.shape[0],) + words.shape[1:])
        return jax.lax.psum(y, "model") if split == "row" else y

    return jax.shard_map(shard, mesh=mesh, in_specs=(x_spec, w_spec, w_spec, w_spec), out_specs=out_spec,
                         check_vma=False)(x, qw["qw"], qw["s"], qw["z"])


def place(h: HostInt4, dtype, sharding, put) -> dict:
    """A HostInt4 -> device arrays: the values packed into int32 words, s and z in the model dtype,
    each with `sharding` (the 16-bit weight's: the word and group axes are split where the input
    axis is, which needs whole groups per shard)."""
    q = np.asarray(h.q4)
    words = ref.pack(q.reshape(q.shape[0], -1)).reshape((q.shape[0] // 8,) + q.shape[1:])
    spec = getattr(sharding, "spec", None)
    if spec is not None and len(spec) and spec[0] is not None:
        shards = int(np.prod([sharding.mesh.shape[a] for a in ((spec[0],) if isinstance(spec[0], str) else spec[0])]))
        if h.s.shape[0] % shards:
            raise ValueError(f"a 4-bit weight with {h.s.shape[0]} groups along its input dimension cannot be split "
                             f"over {shards} devices (tensor parallelism splits it there); use a tensor_parallel_size "
                             f"that divides {h.s.shape[0]}")
    return {"qw": put(words, sharding),
            "s": put(np.asarray(h.s, np.float32).astype(jnp.dtype(dtype)), sharding),
            "z": put(np.asarray(h.z, np.float32).astype(jnp.dtype(dtype)), sharding)}


def dummy_group(k: int) -> int:
    """The group size for random 4-bit weights with K inputs: 128 where it divides K."""
    for g in (128, 64, 32):
        if k % g == 0:
            return g
    return k

