"""Host-side scheduling and KV-block bookkeeping: pure Python + numpy, never imports jax."""
