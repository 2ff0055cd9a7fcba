"""`jaxserve generate | chat | serve | bench ...` — flags map 1:1 onto the engine config fields."""
from __future__ import annotations

import argparse
import sys

from jaxserve.engine_args import add_engine_args, engine_kwargs_from_args


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=128)
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _sampling_params(args):
    from jaxserve.sampling_params import SamplingParams

    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                          seed=args.sampling_seed, stop=args.stop)


def cmd_generate(args) -> int:
    from jaxserve.llm import LLM

    prompts = list(args.prompt or [])
    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        print("error: give --prompt TEXT (repeatable) or prompts on stdin, one per line", file=sys.stderr)
        return 2
    llm = LLM(**engine_kwargs_from_args(args))
    if args.trace:
        llm.llm_engine.trace = []
    outs = llm.generate(prompts, _sampling_params(args), use_tqdm=len(prompts) > 1)
    rc = 0
    for o in outs:
        if o.error:
            print(f"error: {o.error}", file=sys.stderr)
            rc = 1
            continue
        if len(outs) > 1:
            print(f"--- {o.prompt!r}")
        print(o.outputs[0].text)
    if args.trace:
        from jaxserve.engine.trace import save_trace

        save_trace(llm.llm_engine.trace, args.trace)
        print(f"trace: {len(llm.llm_engine.trace)} steps written to {args.trace}", file=sys.stderr)
    return rc


def cmd_chat(args) -> int:
    from jaxserve.llm import LLM

    llm = LLM(**engine_kwargs_from_args(args))
    params = _sampling_params(args)
    messages = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    print("jaxserve chat — empty line or Ctrl-D to quit, /reset to clear the conversation")
    while True:
        try:
            line = input("you> ")
        except EOFError:
            print()
            return 0
        if not line.strip():
            return 0
        if line.strip() == "/reset":
            messages = messages[:1] if args.system else []
            continue
        messages.append({"role": "user", "content": line})
        out = llm.chat(messages, params, use_tqdm=False)[0]
        if out.error:
            print(f"error: {out.error}")
            messages.pop()
            continue
        reply = out.outputs[0].text
        print(f"assistant> {reply}")
        messages.append({"role": "assistant", "content": reply})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="jaxserve", description="JAX/XLA LLM inference engine")
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("generate", help="generate completions for prompts")
    p.add_argument("--prompt", action="append", help="prompt text (repeatable; else read stdin)")
    p.add_argument("--trace", default=None, help="write the engine's per-step trace to this JSON file")
    _sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat in the terminal")
    p.add_argument("--system", default=None, help="system prompt")
    _sampling_args(p)
    add_engine_args(p)
    p.set_defaults(func=cmd_chat)

    try:
        from jaxserve.server_cli import add_serve_args, run_server
    except ImportError:
        add_serve_args = None
    if add_serve_args is not None:
        p = sub.add_parser("serve", help="OpenAI-compatible HTTP server")
        add_serve_args(p)
        p.set_defaults(func=run_server)

    try:
        from jaxserve.bench.cli import add_bench_parser
    except ImportError:
        add_bench_parser = None
    if add_bench_parser is not None:
        add_bench_parser(sub)

    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, MemoryError) as e:  # bad input, no model, does not fit
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
