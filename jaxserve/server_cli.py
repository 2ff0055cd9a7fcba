"""`jaxserve serve` / `python -m jaxserve.entrypoints.openai.api_server`: engine flags (1:1 with the
config) plus the HTTP ones."""
from __future__ import annotations

import argparse
import logging

from jaxserve.engine_args import add_engine_args, engine_kwargs_from_args

logger = logging.getLogger("jaxserve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("model_tag", nargs="?", default=None, help="model (same as --model)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", default=None, help="require Authorization: Bearer <key> on /v1/*")
    g.add_argument("--request-timeout", type=float, default=None, help="seconds allowed per request")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_engine_args(p)


def build_app(args):
    from jaxserve.engine.async_engine import AsyncLLM
    from jaxserve.server.app import create_app
    from jaxserve.server.serving import ServerConfig

    kwargs = engine_kwargs_from_args(args)
    if getattr(args, "model_tag", None) and "model" not in kwargs:
        kwargs["model"] = args.model_tag
    llm = AsyncLLM(kwargs, max_waiting_requests=kwargs.get("max_waiting_requests"))
    llm.wait_ready()  # load + warm-up (the port opens once the model can serve)
    eng = llm.engine
    names = tuple(n.strip() for n in (eng.model_name or "").split(",") if n.strip()) or (eng.model.name,)
    cfg = ServerConfig(model_names=names, max_model_len=eng.max_model_len, api_key=args.api_key,
                       request_timeout=args.request_timeout, max_logprobs=eng.config.max_logprobs)
    return create_app(llm, cfg), llm


def run_server(args) -> int:
    import uvicorn

    from jaxserve.llm import _setup_logging

    _setup_logging()
    logging.getLogger("jaxserve").setLevel(args.log_level.upper())
    access = logging.getLogger("jaxserve.access")
    access.setLevel(logging.INFO)
    app, llm = build_app(args)
    logger.info("serving %s on http://%s:%d", ", ".join(app.state.llm.engine.model_name.split(",")),
                args.host, args.port)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=30)
    finally:
        llm.shutdown()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jaxserve serve")
    add_serve_args(p)
    return run_server(p.parse_args(argv))
