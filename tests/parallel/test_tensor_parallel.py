"""Tensor parallelism on CPU with fake devices (a subprocess, since the device count is fixed when
jax starts): TP=3 on SmolLM2 (9 heads / 3 KV heads) gives the greedy tokens of one device; TP=2
says which sizes work."""
import os
import subprocess
import sys


def test_tp3_equals_single_device_and_tp2_is_refused():
    here = os.path.dirname(__file__)
    out = subprocess.run([sys.executable, os.path.join(here, "tp_check.py")], capture_output=True, text=True,
                         timeout=900, env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert "EQUAL True" in out.stdout, out.stdout
    assert "NamedSharding" in out.stdout and "'model'" in out.stdout  # the KV cache really is split
    assert "TP2: tensor_parallel_size=2 does not divide the model's 9 attention heads; sizes that work: [1, 3, 9]" in out.stdout
