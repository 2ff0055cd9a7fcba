"""`jaxserve bench throughput | latency | serve`."""
from __future__ import annotations


from jaxserve.engine_args import add_engine_args, engine_kwargs_from_args


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (throughput, latency, serve)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)

    p = bsub.add_parser("throughput", help="offline throughput on the LLM API")
    p.add_argument("--dataset", default="random", choices=["random", "sharegpt-like"])
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--json", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=_throughput)

    p = bsub.add_parser("latency", help="batch-N time to first token and decode speed")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=3)
    p.add_argument("--json", action="store_true")
    add_engine_args(p)
    p.set_defaults(func=_latency)

    p = bsub.add_parser("serve", help="online benchmark against a running server")
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--served-model", default=None, help="model name to send (default: the server's first)")
    p.add_argument("--dataset", default="random", choices=["random", "sharegpt-like"])
    p.add_argument("--input-len", type=int, default=1024)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-prompts", type=int, default=200)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--api-key", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_serve)


def _throughput(args) -> int:
    from jaxserve.bench.offline import print_result, run_throughput

    res = run_throughput(engine_kwargs_from_args(args), dataset=args.dataset, num_prompts=args.num_prompts,
                         input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio)
    print_result(res, args.json)
    return 0


def _latency(args) -> int:
    from jaxserve.bench.offline import print_result, run_latency

    res = run_latency(engine_kwargs_from_args(args), batch_size=args.batch_size, input_len=args.input_len,
                      output_len=args.output_len, num_iters=args.num_iters)
    print_result(res, args.json)
    return 0


def _serve(args) -> int:
    import httpx

    from jaxserve.bench.datasets import make_requests
    from jaxserve.bench.offline import print_result
    from jaxserve.bench.serve import run_serve_bench

    model = args.served_model
    if model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers).json()["data"][0]["id"]
    reqs = make_requests(args.dataset, args.num_prompts, args.input_len, args.output_len, args.vocab_size,
                         args.max_model_len, args.seed, args.range_ratio)
    res = run_serve_bench(args.base_url, model, reqs, request_rate=args.request_rate,
                          burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                          api_key=args.api_key, seed=args.seed)
    print_result(res, args.json)
    return 0 if res["failed"] == 0 else 1
