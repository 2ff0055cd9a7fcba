"""`jaxserve serve` / `python -m jaxserve.entrypoints.openai.api_server`: engine flags (1:1 with the
config) plus the HTTP ones."""
from __future__ import annotations

import argparse
import contextlib
import logging
import signal

import uvicorn

from jaxserve.engine_args import add_engine_args, engine_kwargs_from_args

logger = logging.getLogger("jaxserve")


def add_serve_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("model_tag", nargs="?", default=None, help="model (same as --model)")
    g.add_argument("--host", default="127.0.0.1")
    g.add_argument("--port", type=int, default=8000)
    g.add_argument("--api-key", action="append", default=None,
                   help="require Authorization: Bearer <key> (repeat or comma-separate for several keys)")
    g.add_argument("--request-timeout", type=float, default=None, help="seconds allowed per request")
    g.add_argument("--rate-limit-rps", type=float, default=None,
                   help="requests/s allowed per API key (per client address without keys); 429 past it")
    g.add_argument("--rate-limit-burst", type=int, default=20, help="token-bucket burst for --rate-limit-rps")
    g.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM: seconds in-flight requests may take to finish before exit")
    g.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    g.add_argument("--log-format", default="text", choices=["text", "json"])
    g.add_argument("--log-prompts", action="store_true", help="include prompt text in access logs (off by default)")
    add_engine_args(p)


def build_app(args):
    from jaxserve.engine.async_engine import AsyncLLM
    from jaxserve.server.app import create_app
    from jaxserve.server.serving import ServerConfig

    kwargs = engine_kwargs_from_args(args)
    if (kwargs.get("num_processes") or 1) > 1:
        raise SystemExit("jaxserve serve does not support --num-processes > 1 yet (every process would need "
                         "every request); run multi-host jobs as LLM(...) batch scripts on all hosts, or one "
                         "server per host (data parallel behind a load balancer)")
    if getattr(args, "model_tag", None) and "model" not in kwargs:
        kwargs["model"] = args.model_tag
    from jaxserve.usage_defaults import SERVER, apply_usage_defaults

    kwargs = apply_usage_defaults(kwargs, SERVER)  # short steps on accelerators (TPOT)
    llm = AsyncLLM(kwargs, max_waiting_requests=kwargs.get("max_waiting_requests"))
    llm.wait_ready()  # load + warm-up (the port opens once the model can serve)
    eng = llm.engine
    names = tuple(n.strip() for n in (eng.model_name or "").split(",") if n.strip()) or (eng.model.name,)
    keys = tuple(k.strip() for arg in (args.api_key or []) for k in arg.split(",") if k.strip())
    cfg = ServerConfig(model_names=names, max_model_len=eng.max_model_len, api_keys=keys,
                       request_timeout=args.request_timeout, max_logprobs=eng.config.max_logprobs,
                       rate_limit_rps=args.rate_limit_rps, rate_limit_burst=args.rate_limit_burst,
                       log_prompts=args.log_prompts)
    return create_app(llm, cfg), llm


def run_server(args) -> int:
    from jaxserve.llm import _setup_logging

    _setup_logging()
    log = logging.getLogger("jaxserve")
    log.setLevel(args.log_level.upper())
    if args.log_format == "json":
        for h in log.handlers:
            h.setFormatter(JsonFormatter())
    logging.getLogger("jaxserve.access").setLevel(logging.INFO)
    app, llm = build_app(args)
    logger.info("serving %s on http://%s:%d", ", ".join(app.state.llm.engine.model_name.split(",")),
                args.host, args.port)
    try:
        # SIGTERM: uvicorn stops accepting, in-flight requests (streams too) finish within the
        # timeout, the app's shutdown hook marks the engine draining (/ready -> 503), then exit 0.
        config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning",
                                timeout_graceful_shutdown=args.shutdown_timeout)
        server = _GracefulServer(config)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(server, "should_exit", True))
        server.run()
    finally:
        llm.shutdown()
    return 0


class _GracefulServer(uvicorn.Server):
    """uvicorn re-raises SIGTERM after its graceful shutdown (exit status 143); a drained server
    should exit 0, so the signal handlers are ours and only set should_exit."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


class JsonFormatter(logging.Formatter):
    """One JSON object per line; access lines carry their fields as keys."""

    def format(self, record: logging.LogRecord) -> str:
        import json

        out = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        out.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="jaxserve serve")
    add_serve_args(p)
    return run_server(p.parse_args(argv))
