"""CLI flags generated from the config dataclasses: every field is one flag (``max_num_seqs`` ->
``--max-num-seqs``), so flags and config can never drift apart."""
from __future__ import annotations

import argparse
import dataclasses
import json
import typing

from jaxserve.config import CacheConfig, EngineConfig, ModelConfig, ParallelConfig, SchedulerConfig, SpeculativeConfig

_SECTIONS = (ModelConfig, CacheConfig, SchedulerConfig, ParallelConfig, SpeculativeConfig, EngineConfig)
_SKIP = {"model", "cache", "scheduler", "parallel", "speculative"}  # EngineConfig's sub-configs


def _arg_type(tp):
    tp = tp if not isinstance(tp, str) else eval(tp, {"Optional": typing.Optional})  # noqa: S307
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return base


def _json_dict(text: str) -> dict:
    """A dict-valued flag takes JSON: --rope-scaling '{"rope_type": "dynamic", "factor": 4.0}'."""
    try:
        v = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r} ({e.msg})") from None
    if not isinstance(v, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return v


def add_engine_args(parser: argparse.ArgumentParser, *, model_positional: bool = False) -> None:
    g = parser.add_argument_group("engine")
    for cls in _SECTIONS:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if cls is EngineConfig and f.name in _SKIP:
                continue
            flag = "--" + f.name.replace("_", "-")
            default = f.default if f.default is not dataclasses.MISSING else None
            tp = _arg_type(hints[f.name])
            if tp is dict:
                tp = _json_dict
            if tp is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=None,
                               help=f"(default: {default})")
            else:
                g.add_argument(flag, type=tp, default=None, help=f"(default: {default})")
    g.add_argument("--speculative-config", type=_json_dict, default=None,
                   help='vLLM\'s dict form, e.g. \'{"method": "ngram", "num_speculative_tokens": 5}\'')


def engine_kwargs_from_args(args: argparse.Namespace) -> dict:
    """Only the flags the user gave, so the config's own defaults apply to the rest."""
    out = {}
    for cls in _SECTIONS:
        for f in dataclasses.fields(cls):
            if cls is EngineConfig and f.name in _SKIP:
                continue
            v = getattr(args, f.name, None)
            if v is not None:
                out[f.name] = v
    if getattr(args, "speculative_config", None) is not None:
        out["speculative_config"] = args.speculative_config
    return out
