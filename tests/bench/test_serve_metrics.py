"""`jaxserve bench serve`'s summary on synthetic request timings: the percentiles vLLM's harness
reports (--percentile-metrics / --metric-percentiles), end-to-end latency, goodput under SLOs
(--goodput), and clear errors for bad settings. Oracles: order statistics picked by hand from the
sorted values, and SLO checks written out per request."""
import math

import pytest

from jaxserve.bench.serve import _Result, parse_goodput, parse_percentile_args, summarize


def _req(ttft, latency, tokens, ok=True):
    """A streamed request: first token at ttft, the rest evenly spaced until latency (seconds)."""
    gap = (latency - ttft) / (tokens - 1) if tokens > 1 else 0.0
    return _Result(ok=ok, ttft=ttft, latency=latency, itls=[gap] * (tokens - 1), output_tokens=tokens,
                   prompt_tokens=10, error="" if ok else "HTTP 500")


# (ttft s, e2e s, output tokens): five completed requests with distinct values, and one failure
REQS = [_req(0.10, 1.10, 11), _req(0.30, 0.90, 4), _req(0.05, 0.45, 9), _req(0.20, 2.20, 5), _req(0.50, 0.50, 1),
        _req(9.0, 9.0, 3, ok=False)]


def _summary(**kw):
    args = dict(request_rate=4.0, max_concurrency=None, percentile_metrics=("ttft", "tpot", "itl", "e2el"),
                metric_percentiles=(50, 100), goodput=None)
    args.update(kw)
    return summarize(REQS, 2.0, **args)


def test_percentiles_are_order_statistics_of_the_completed_requests():
    res = _summary()
    ok = [r for r in REQS if r.ok]
    ttfts = sorted(r.ttft for r in ok)  # five values: the median / p50 is the third, p100 the largest
    assert res["ttft_ms_p50"] == pytest.approx(ttfts[2] * 1e3) == pytest.approx(res["ttft_ms_median"])
    assert res["ttft_ms_p100"] == pytest.approx(ttfts[-1] * 1e3)
    e2e = sorted(r.latency for r in ok)
    assert res["e2el_ms_p50"] == pytest.approx(e2e[2] * 1e3) and res["e2el_ms_p100"] == pytest.approx(2200)
    # TPOT leaves out the one-token request: four values (0.1, 0.2, 0.05, 0.5 s)
    tpots = sorted((r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1)
    assert len(tpots) == 4 and res["tpot_ms_p100"] == pytest.approx(tpots[-1] * 1e3)
    assert res["tpot_ms_mean"] == pytest.approx(sum(tpots) / 4 * 1e3)
    assert res["completed"] == 5 and res["failed"] == 1 and res["first_error"] == "HTTP 500"
    assert res["requests_per_s"] == pytest.approx(2.5)


def test_only_the_asked_metrics_and_percentiles_are_reported():
    res = _summary(percentile_metrics=("ttft",), metric_percentiles=(99.9,))
    keys = {k for k in res if k.endswith(("_mean", "_median")) or "_ms_p" in k}
    assert keys == {"ttft_ms_mean", "ttft_ms_median", "ttft_ms_p99.9"}


def test_goodput_counts_requests_within_every_slo():
    slos = parse_goodput(["ttft:250", "e2el:1500"])
    assert slos == {"ttft": 0.25, "e2el": 1.5}
    res = _summary(goodput=slos)
    # by hand: (0.10, 1.10) yes; (0.30, 0.90) ttft too late; (0.05, 0.45) yes; (0.20, 2.20) too long;
    # (0.50, 0.50) ttft too late; the failed request never counts
    assert res["good_requests"] == 2 and res["request_goodput"] == pytest.approx(1.0)
    # a one-token output has no TPOT, so a TPOT SLO does not reject it
    res = _summary(goodput=parse_goodput(["tpot:150"]))
    assert res["good_requests"] == 3  # TPOTs 100, 200, 50, 500 ms, and the one-token request
    assert res["goodput_slos_ms"] == {"tpot": 150.0}


@pytest.mark.parametrize("items, words", [(["ttft"], "NAME:MILLISECONDS"), (["itl:5"], "NAME:MILLISECONDS"),
                                          (["ttft:fast"], "not a number"), (["e2el:-1"], ">= 0")])
def test_bad_goodput_settings_are_explained(items, words):
    with pytest.raises(ValueError, match=words):
        parse_goodput(items)


def test_percentile_settings_are_checked():
    assert parse_percentile_args("ttft, e2el", "50,99.9") == (("ttft", "e2el"), (50.0, 99.9))
    for metrics, qs in (("ttft,latency", "99"), ("", "99"), ("ttft", "0"), ("ttft", "ninety"), ("ttft", "101")):
        with pytest.raises(ValueError):
            parse_percentile_args(metrics, qs)


def test_no_completed_request_gives_nan_not_a_crash():
    res = summarize([_req(1.0, 2.0, 3, ok=False)], 1.0, request_rate=math.inf, max_concurrency=2,
                    percentile_metrics=("ttft", "itl"), metric_percentiles=(99,), goodput={"ttft": 1.0})
    assert res["completed"] == 0 and math.isnan(res["ttft_ms_p99"]) and math.isnan(res["itl_ms_mean"])
    assert res["good_requests"] == 0
