"""The device memory a model's weights take, checked before any tensor is placed: a model that
cannot fit says so and what to change, instead of XLA's out-of-memory error partway through
loading (e.g. Llama-3-70B in bf16, 131 GiB, on one H200 whose allocator has 126 GiB)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np

from jaxserve.models.quant import QUANTIZED

GIB = 1 << 30


class ModelTooLargeError(MemoryError):
    """The weights alone exceed the device memory the allocator may use."""


def weight_bytes(shapes: dict, dtype, quantization: Optional[str] = None) -> int:
    """Bytes of a params pytree of shapes (a model module's param_shapes): each leaf in `dtype`,
    the layer projections (quant.QUANTIZED) in float8 plus one float32 scale per output channel
    when quantization is "fp8", or in 4 bits plus a scale and a zero per group of 128 inputs for
    "awq" / "gptq"."""
    item = np.dtype(dtype).itemsize
    total = sum(math.prod(s) * item for k, s in shapes.items() if k != "layers")
    for layer in shapes.get("layers", []):
        for name, s in layer.items():
            n = math.prod(s)
            if quantization in ("awq", "gptq") and name in QUANTIZED:
                total += n // 2 + 2 * item * (n // 128)
            else:
                total += (n + 4 * (n // s[0])) if quantization and name in QUANTIZED else n * item
    return total


def check_weights_fit(total: int, *, devices: int, device_limit: Optional[int], where: str,
                      utilization: float, quantization: Optional[str], fp8_total: Optional[int] = None) -> None:
    """Raise ModelTooLargeError when `total` weight bytes spread over `devices` (tensor x pipeline
    parallel; an even split is the best any sharding does) exceed `device_limit`, the bytes the
    allocator may use per device (None: unknown, e.g. the CPU, no check). fp8_total: the same
    model's bytes with float8 projections, to suggest quantization when it would fit."""
    if device_limit is None or total / devices <= device_limit:
        return
    need = math.ceil(total / device_limit)
    ways = [f"spread it over at least {need} devices (tensor_parallel_size x pipeline_parallel_size, "
            f"now {devices})"]
    if quantization is None and fp8_total is not None:
        fits = "fits" if fp8_total / devices <= device_limit else f"needs {math.ceil(fp8_total / device_limit)} devices"
        ways.insert(0, f"quantization='fp8' ({fp8_total / GIB:.1f} GiB: {fits})")
    ways.append(f"raise gpu_memory_utilization (now {utilization}) if the device has memory to spare")
    raise ModelTooLargeError(
        f"the model's weights take {total / GIB:.1f} GiB ({total / devices / GIB:.1f} GiB per device over "
        f"{devices}), more than the {device_limit / GIB:.1f} GiB the allocator may use on {where}; "
        + "; or ".join(ways))
