"""Benchmark harness: `jaxserve bench throughput | latency | serve` (vLLM's bench, the JAX way)."""
