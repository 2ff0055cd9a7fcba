"""The matrix products of a compiled XLA program, by the top-level instruction that runs them: a
cuBLAS custom call, or a fusion (e.g. a Triton GEMM) whose computation holds a dot. Joined with a
profile's per-instruction device time (jaxserve.bench.profile.op_times) this says what rate each
projection of a real engine step runs at, which a GEMM timed alone from Python cannot (below ~50 us
per call, a loop of jitted calls measures the host's dispatch, not the kernel).

    dots(compiled.as_text()) -> {instruction name: Dot(m, k, n, flops)}
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

_COMP = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s*\(.*\)\s*->\s*.*\{\s*$")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(\(.*?\)|\S+)\s+([\w\-]+)\((.*?)\)(.*)$")
_SHAPE = re.compile(r"\w+\[([\d,]*)\]")
_CUBLAS = ("__cublas$gemm", "__cublas$lt$matmul")


@dataclass(frozen=True)
class Dot:
    m: int  # output rows (all output dims but the last, multiplied)
    k: int  # contracted size
    n: int  # output's last dim
    flops: int

    @property
    def label(self) -> str:
        return f"{self.m}x{self.k}x{self.n}"


def _dims(type_text: str) -> tuple:
    """The first array shape in an HLO type ("bf16[16,64]{1,0}" or a tuple of them)."""
    m = _SHAPE.search(type_text)
    return tuple(int(d) for d in m.group(1).split(",") if d) if m else ()


def _operands(text: str) -> list:
    """Operand names; typed operands ("bf16[16,64]{1,0} %x") have commas inside their types."""
    named = re.findall(r"%([\w.\-]+)", text)
    return named or [t.strip() for t in text.split(",") if t.strip()]


def _dot(out: tuple, lhs: tuple, contracting: list) -> Dot:
    k = math.prod(lhs[i] for i in contracting) if lhs else 0
    m = math.prod(out[:-1]) if len(out) > 1 else 1
    n = out[-1] if out else 1
    return Dot(m, k, n, 2 * math.prod(out) * k)


def _parse(text: str) -> dict:
    """{computation: [(name, type text, opcode, operand text, attributes)]}."""
    comps, cur = {}, None
    for line in text.splitlines():
        head = _COMP.match(line)
        if head:
            cur = comps.setdefault(head.group(1), [])
            continue
        if cur is None:
            continue
        if line.strip() == "}":
            cur = None
            continue
        ins = _INSTR.match(line)
        if ins:
            cur.append(ins.groups())
    return comps


def dots(hlo_text: str) -> dict:
    """{top-level instruction: Dot} for every instruction of a non-fused computation that multiplies
    matrices: cuBLAS custom calls and fusions whose computation holds a dot (summed if several)."""
    comps = _parse(hlo_text)
    shapes = {c: {name: _dims(ty) for name, ty, *_ in ins} for c, ins in comps.items()}
    inner = {}  # fused computation -> Dot of the dot(s) inside
    for c, ins in comps.items():
        for _name, ty, op, args, attrs in ins:
            if op != "dot":
                continue
            cd = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", attrs)
            lhs = shapes[c].get(_operands(args)[0], ())
            d = _dot(_dims(ty), lhs, [int(i) for i in cd.group(1).split(",") if i] if cd else [len(lhs) - 1])
            prev = inner.get(c)
            inner[c] = d if prev is None else Dot(d.m, d.k, d.n, prev.flops + d.flops)
    out = {}
    for c, ins in comps.items():
        for name, ty, op, args, attrs in ins:
            if op == "custom-call" and any(f'custom_call_target="{t}"' in attrs for t in _CUBLAS):
                cd = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', attrs)
                lhs = shapes[c].get(_operands(args)[0], ())
                idx = [int(i.strip('" ')) for i in cd.group(1).split(",") if i.strip('" ')] if cd else [len(lhs) - 1]
                out[name] = _dot(_dims(ty), lhs, idx)
            elif op == "fusion":
                called = re.search(r"calls=%?([\w.\-]+)", attrs)
                if called and called.group(1) in inner:
                    out[name] = inner[called.group(1)]
    return out


def dot_rates(hlo_text: str, times: dict, runs: int) -> list:
    """Per product shape (m x k x n), over `runs` runs of the program: how many instructions of that
    shape one run has, device us per instruction and its TFLOP/s. times: {instruction: [ns,
    launches]} (jaxserve.bench.profile.op_times). Instructions the profile lacks are skipped."""
    groups: dict = {}
    for name, d in dots(hlo_text).items():
        if name not in times:
            continue
        g = groups.setdefault(d.label, dict(shape=d.label, m=d.m, k=d.k, n=d.n, ops=0, ns=0.0, flops=0))
        g["ops"] += 1
        g["ns"] += times[name][0]
        g["flops"] += d.flops * runs
    rows = []
    for g in groups.values():
        rows.append(dict(shape=g["shape"], m=g["m"], k=g["k"], n=g["n"], per_run=g["ops"],
                         us_each=round(g["ns"] / 1e3 / runs / g["ops"], 2),
                         ms_per_run=round(g["ns"] / 1e6 / runs, 4),
                         tflop_per_s=float(f"{g['flops'] / g['ns'] / 1e3:.4g}") if g["ns"] else None))
    return sorted(rows, key=lambda r: -r["ms_per_run"])
