"""`jaxserve bench throughput | latency | serve`."""
from __future__ import annotations


from jaxserve.bench.datasets import DATASETS
from jaxserve.engine_args import add_engine_args, engine_kwargs_from_args


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks (throughput, latency, serve)")
    bsub = bench.add_subparsers(dest="bench_cmd", required=True)

    p = bsub.add_parser("throughput", help="offline throughput on the LLM API")
    _workload_args(p, input_len=128, output_len=128, num_prompts=100)
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--output-json", default=None, metavar="FILE", help="also write the result to FILE")
    add_engine_args(p)
    p.set_defaults(func=_throughput)

    p = bsub.add_parser("latency", help="batch-N time to first token and decode speed")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--input-len", type=int, default=32)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--num-iters", type=int, default=3, help="timed iterations")
    p.add_argument("--num-iters-warmup", type=int, default=1, help="untimed iterations first")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--output-json", default=None, metavar="FILE", help="also write the result to FILE")
    add_engine_args(p)
    p.set_defaults(func=_latency)

    p = bsub.add_parser("serve", help="online benchmark against a running server")
    p.add_argument("--base-url", default=None, help="the server (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model", "--model", dest="served_model", default=None,
                   help="model name to send (default: the server's first)")
    _workload_args(p, input_len=1024, output_len=128, num_prompts=200)
    p.add_argument("--request-rate", type=float, default=float("inf"))
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--vocab-size", type=int, default=32000, help="token ids are drawn below this")
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--api-key", default=None)
    p.add_argument("--tokenizer", default=None,
                   help="the served model's tokenizer (HF directory or .gguf), to count a dataset's tokens")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--percentile-metrics", default="ttft,tpot,itl",
                   help="comma-separated subset of ttft,tpot,itl,e2el to report percentiles of")
    p.add_argument("--metric-percentiles", default="99", help="comma-separated percentiles, e.g. 50,90,99")
    p.add_argument("--goodput", nargs="+", default=None, metavar="NAME:MS",
                   help="SLOs (ttft, tpot, e2el in milliseconds): also report the requests/s that met all of them")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--save-result", action="store_true", help="write the result and the run's settings as JSON")
    p.add_argument("--result-dir", default=".", help="where --save-result writes (default: here)")
    p.add_argument("--result-filename", default=None,
                   help="its file name (default: jaxserve-<rate>qps-<model>-<date>.json)")
    p.set_defaults(func=_serve)


def _workload_args(p, *, input_len: int, output_len: int, num_prompts: int) -> None:
    """The request set's flags, under jaxserve's names and vLLM's (--dataset-name, --random-*)."""
    p.add_argument("--dataset", "--dataset-name", dest="dataset", default="random", choices=DATASETS)
    p.add_argument("--dataset-path", default=None, help="a ShareGPT-format JSON file (--dataset sharegpt)")
    p.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="output tokens per request for --dataset sharegpt (default: each reply's length)")
    p.add_argument("--input-len", "--random-input-len", dest="input_len", type=int, default=input_len)
    p.add_argument("--output-len", "--random-output-len", dest="output_len", type=int, default=output_len)
    p.add_argument("--num-prompts", type=int, default=num_prompts)
    p.add_argument("--range-ratio", "--random-range-ratio", dest="range_ratio", type=float, default=0.0)


def _throughput(args) -> int:
    from jaxserve.bench.offline import print_result, run_throughput, write_result

    res = run_throughput(engine_kwargs_from_args(args), dataset=args.dataset, num_prompts=args.num_prompts,
                         input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio,
                         dataset_path=args.dataset_path, fixed_output_len=args.sharegpt_output_len)
    print_result(res, args.json)
    if args.output_json:
        write_result(res, args.output_json)
    return 0


def _latency(args) -> int:
    from jaxserve.bench.offline import print_result, run_latency, write_result

    res = run_latency(engine_kwargs_from_args(args), batch_size=args.batch_size, input_len=args.input_len,
                      output_len=args.output_len, num_iters=args.num_iters, num_iters_warmup=args.num_iters_warmup)
    print_result(res, args.json)
    if args.output_json:
        write_result(res, args.output_json)
    return 0


def _serve(args) -> int:
    import datetime
    import os

    import httpx

    from jaxserve.bench.datasets import check_dataset, make_requests
    from jaxserve.bench.offline import print_result, write_result
    from jaxserve.bench.serve import parse_goodput, parse_percentile_args, run_serve_bench

    # Settings are checked before any request goes out.
    metrics, percentiles = parse_percentile_args(args.percentile_metrics, args.metric_percentiles)
    slos = parse_goodput(args.goodput) if args.goodput else None
    check_dataset(args.dataset, args.dataset_path)
    tokenizer = None
    if args.dataset == "sharegpt":
        from jaxserve.tokenizer import load_tokenizer

        if args.tokenizer is None:
            raise ValueError("--dataset sharegpt needs --tokenizer (the served model's tokenizer directory or "
                             ".gguf) to count the prompts' and replies' tokens")
        tokenizer = load_tokenizer(args.tokenizer)
    base_url = args.base_url or f"http://{args.host}:{args.port}"
    model = args.served_model
    if model is None:
        headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        model = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers).json()["data"][0]["id"]
    reqs = make_requests(args.dataset, args.num_prompts, args.input_len, args.output_len, args.vocab_size,
                         args.max_model_len, args.seed, args.range_ratio, dataset_path=args.dataset_path,
                         tokenizer=tokenizer, fixed_output_len=args.sharegpt_output_len)
    res = run_serve_bench(base_url, model, reqs, request_rate=args.request_rate,
                          burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                          api_key=args.api_key, seed=args.seed, percentile_metrics=metrics,
                          metric_percentiles=percentiles, goodput=slos)
    print_result(res, args.json)
    if args.save_result:
        now = datetime.datetime.now()
        name = args.result_filename or \
            f"jaxserve-{args.request_rate:g}qps-{os.path.basename(model.rstrip('/'))}-{now:%Y%m%d-%H%M%S}.json"
        settings = dict(date=now.isoformat(timespec="seconds"), base_url=base_url, model=model,
                        dataset=args.dataset, dataset_path=args.dataset_path, input_len=args.input_len,
                        output_len=args.output_len, range_ratio=args.range_ratio, burstiness=args.burstiness,
                        seed=args.seed)
        write_result({**settings, **res}, os.path.join(args.result_dir, name))
    return 0 if res["failed"] == 0 else 1
