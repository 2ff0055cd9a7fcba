"""A GGUF file's metadata and tensor table in one pass over its header (format versions 2 and 3,
little-endian), the tensors as read-only views of the memory-mapped file.

The `gguf` package's reader builds an object per array element of the metadata: 5.5 s for the
embedded model's 49k-token vocabulary and 48k merges, in every process that opens the file (each
notebook, CLI command and server). Here numeric arrays are one numpy view each and string arrays one
decode per string: ~0.1 s. Layout (github.com/ggml-org/ggml, docs/gguf.md): magic "GGUF", uint32
version, uint64 tensor count, uint64 key count, the keys (string, uint32 type, value), the tensor
infos (string name, uint32 n_dims, uint64 dims[n_dims] fastest-varying first, uint32 ggml type,
uint64 offset), padding to `general.alignment` (32 by default), the tensor data.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
            10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9
# ggml types stored as plain elements (the others are blocks of bytes: gguf.constants.GGML_QUANT_SIZES)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ggml_type: int  # gguf.GGMLQuantizationType's value
    shape: tuple  # numpy order: the file's dims reversed
    data: np.ndarray  # typed [shape] for plain types; uint8 [*shape[:-1], bytes per row] for block-quantized


class GGUFFile:
    """metadata: key -> value (int / float / bool / str, a numpy array for a numeric array, a list of
    str for a string array); tensors: GGUFTensor in the file's order."""

    def __init__(self, path: str):
        self.path = path
        if os.path.getsize(path) < len(MAGIC):
            raise ValueError(f"{path} is not a GGUF file (it has fewer than 4 bytes)")
        buf = np.memmap(path, mode="r", dtype=np.uint8)
        self._pos = len(MAGIC)
        self._buf = buf
        if bytes(buf[:4]) != MAGIC:
            raise ValueError(f"{path} is not a GGUF file (its first bytes are {bytes(buf[:4])!r}, not b'GGUF')")
        version = self._unpack("<I")
        if version & 0xFFFF == 0:
            raise ValueError(f"{path} is a big-endian GGUF file; only little-endian files are supported")
        if version not in VERSIONS:
            raise ValueError(f"{path}: GGUF version {version} is not supported (versions {VERSIONS})")
        n_tensors, n_keys = self._unpack("<Q"), self._unpack("<Q")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_keys):
            key = self._string()
            self.metadata[key] = self._value(self._unpack("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            n_dims = self._unpack("<I")
            self._check_end("the header", self._pos + 8 * n_dims)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, self._pos)
            self._pos += 8 * n_dims
            infos.append((name, dims, self._unpack("<I"), self._unpack("<Q")))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        if align <= 0 or align & (align - 1):
            raise ValueError(f"{path}: general.alignment={align} is not a power of two")
        start = -(-self._pos // align) * align
        self.tensors = [self._tensor(start, *info) for info in infos]
        self.tensor_names = {t.name for t in self.tensors}

    def _unpack(self, fmt: str):
        self._check_end("the header", self._pos + struct.calcsize(fmt))
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += struct.calcsize(fmt)
        return v

    def _string(self) -> str:
        n = self._unpack("<Q")
        self._check_end("the header", self._pos + n)
        s = bytes(self._buf[self._pos:self._pos + n]).decode("utf-8", errors="replace")
        self._pos += n
        return s

    def _value(self, vtype: int):
        if vtype == _STRING:
            return self._string()
        if vtype in _SCALARS:
            return self._numbers(_SCALARS[vtype], 1)[0].item()
        if vtype == _ARRAY:
            itype, count = self._unpack("<I"), self._unpack("<Q")
            if itype in _SCALARS:
                return self._numbers(_SCALARS[itype], count)
            if itype == _STRING:
                return self._strings(count)
            return [self._value(itype) for _ in range(count)]  # nested arrays
        raise ValueError(f"{self.path}: unknown GGUF value type {vtype} at byte {self._pos}")

    def _numbers(self, dtype: str, count: int) -> np.ndarray:
        self._check_end("the header", self._pos + count * np.dtype(dtype).itemsize)
        arr = np.frombuffer(self._buf, dtype, count, self._pos)
        self._pos += arr.nbytes
        return arr

    def _strings(self, count: int) -> list:
        """count strings in a row (a vocabulary: the one loop of the header that is long)."""
        mv, pos, out = memoryview(self._buf), self._pos, []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            self._check_end("the header", pos + 8)
            (n,) = unpack(mv, pos)
            self._check_end("the header", pos + 8 + n)
            out.append(str(mv[pos + 8:pos + 8 + n], "utf-8", "replace"))
            pos += 8 + n
        self._pos = pos
        return out

    def _tensor(self, start: int, name: str, dims: tuple, ggml_type: int, offset: int) -> GGUFTensor:
        shape = tuple(int(d) for d in reversed(dims))
        n = int(np.prod(shape, dtype=np.int64))
        at = start + offset
        if ggml_type in _PLAIN:
            dtype = np.dtype(_PLAIN[ggml_type])
            self._check_end(name, at + n * dtype.itemsize)
            data = np.frombuffer(self._buf, dtype, n, at).reshape(shape)
        else:
            from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

            try:
                block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (KeyError, ValueError):
                raise ValueError(f"{self.path}: tensor {name!r} has ggml type {ggml_type}, which this gguf "
                                 f"package does not know; upgrade it (pip install -U gguf)") from None
            if shape[-1] % block:
                raise ValueError(f"{self.path}: tensor {name!r} of shape {shape} is not whole blocks of {block}")
            row = shape[-1] // block * size
            self._check_end(name, at + n // shape[-1] * row)
            data = np.frombuffer(self._buf, np.uint8, n // shape[-1] * row, at).reshape(*shape[:-1], row)
        return GGUFTensor(name, ggml_type, shape, data)

    def _check_end(self, what: str, end: int):
        if end > len(self._buf):
            raise ValueError(f"{self.path} is truncated: {what!r} ends at byte {end}, the file has {len(self._buf)}")


def dequantize(t: GGUFTensor, chunk_blocks: int = 1 << 16) -> np.ndarray:
    """t's values as float32 [t.shape]. Block-quantized types run gguf.quants' own block formula over
    chunks of 65k blocks (its dequantize() calls it per 16 rows: ~2x slower on the embedded model)."""
    import gguf

    if t.ggml_type in _PLAIN:
        return np.asarray(t.data, np.float32)
    qtype = gguf.GGMLQuantizationType(t.ggml_type)
    cls = getattr(gguf.quants, qtype.name, None)
    if not hasattr(cls, "dequantize_blocks"):  # (a type this gguf package has no formula for raises here)
        return np.asarray(gguf.quants.dequantize(t.data, qtype), np.float32).reshape(t.shape)
    _, size = gguf.constants.GGML_QUANT_SIZES[qtype]
    blocks = t.data.reshape(-1, size)
    out = np.empty(int(np.prod(t.shape, dtype=np.int64)), np.float32)
    at = 0
    for i in range(0, len(blocks), chunk_blocks):
        part = cls.dequantize_blocks(blocks[i:i + chunk_blocks]).reshape(-1)
        out[at:at + part.size] = part
        at += part.size
    return out.reshape(t.shape)
