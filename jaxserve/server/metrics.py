"""Prometheus metrics under vLLM's names with a `jaxserve:` prefix.

Gauges and counters that the engine owns are read from its latest stats snapshot at scrape time;
latency histograms and finished-request counters are observed by the server per request.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

P = "jaxserve:"

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                 20.0, 40.0, 80.0)
_TPOT_BUCKETS = (0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4,
                 0.5, 0.75, 1.0, 2.5)
_E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0)


class _EngineCollector:
    def __init__(self, llm, model_name: str):
        self.llm = llm
        self.model_name = model_name

    def collect(self):
        s = self.llm.stats
        labels = ["model_name"]
        v = [self.model_name]

        def gauge(name, doc, value):
            g = GaugeMetricFamily(P + name, doc, labels=labels)
            g.add_metric(v, value)
            return g

        def counter(name, doc, value):
            c = CounterMetricFamily(P + name, doc, labels=labels)
            c.add_metric(v, value)
            return c

        if s is None:
            return
        yield gauge("num_requests_running", "Sequences running on the device.", s.num_running)
        yield gauge("num_requests_waiting", "Sequences waiting to be scheduled.", s.num_waiting)
        yield gauge("num_requests_swapped", "Sequences swapped out to host memory.", s.num_swapped)
        yield gauge("kv_cache_usage_perc", "KV-cache usage (0..1).", s.kv_cache_usage)
        yield gauge("gpu_cache_usage_perc", "KV-cache usage (0..1), vLLM's older name.", s.kv_cache_usage)
        yield counter("prompt_tokens", "Prompt tokens admitted.", s.prompt_tokens_total)
        yield counter("generation_tokens", "Tokens generated.", s.generation_tokens_total)
        yield counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache.", s.prefix_cache_queries)
        yield counter("prefix_cache_hits", "Prompt tokens found in the prefix cache.", s.prefix_cache_hits)
        yield counter("num_preemptions", "Sequences preempted.", s.num_preemptions_total)
        yield counter("spec_decode_num_drafts", "Speculative decoding: sequence-steps with proposed tokens.",
                      s.spec_num_drafts)
        yield counter("spec_decode_num_draft_tokens", "Speculative decoding: tokens proposed.", s.spec_num_draft_tokens)
        yield counter("spec_decode_num_accepted_tokens", "Speculative decoding: proposed tokens accepted.",
                      s.spec_num_accepted_tokens)
        yield gauge("num_compilations", "Compiled step variants (constant after warm-up).", s.num_compilations)


class Metrics:
    def __init__(self, llm, model_name: str):
        self.registry = CollectorRegistry()
        self.registry.register(_EngineCollector(llm, model_name))
        lab = ["model_name"]
        self.model_name = model_name
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Time to first token.", lab,
                              buckets=_TTFT_BUCKETS, registry=self.registry)
        self.tpot = Histogram(P + "time_per_output_token_seconds", "Time per output token after the first.",
                              lab, buckets=_TPOT_BUCKETS, registry=self.registry)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "End-to-end request latency.", lab,
                             buckets=_E2E_BUCKETS, registry=self.registry)
        self.success = Counter(P + "request_success", "Finished requests by finish reason.",
                               lab + ["finished_reason"], registry=self.registry)
        self.http_errors = Counter(P + "request_errors", "Requests answered with an error status.",
                                   lab + ["status"], registry=self.registry)

    def observe(self, ttft: float | None, e2e: float, n_out: int, finish_reason: str | None) -> None:
        m = self.model_name
        if ttft is not None:
            self.ttft.labels(m).observe(ttft)
            if n_out > 1:
                self.tpot.labels(m).observe((e2e - ttft) / (n_out - 1))
        self.e2e.labels(m).observe(e2e)
        self.success.labels(m, finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
