"""Usage-context defaults: filled in only where the user gave nothing, only on accelerators."""
import pytest

from jaxserve.usage_defaults import OFFLINE, SERVER, apply_usage_defaults, usage_defaults


def test_cpu_keeps_the_config_defaults():
    assert usage_defaults(OFFLINE, "cpu", 24.0) == {} and usage_defaults(SERVER, "cpu", None) == {}
    assert apply_usage_defaults({"max_model_len": 64}, OFFLINE) == {"max_model_len": 64}  # this machine: CPU


@pytest.mark.parametrize("gib, seqs, tokens", [(59.3, 1024, 8192), (20.0, 256, 4096), (None, 256, 4096)])
def test_offline_steps_grow_with_device_memory(gib, seqs, tokens):
    got = apply_usage_defaults({}, OFFLINE, device_info=lambda util: ("gpu", gib))
    assert got == {"max_num_seqs": seqs, "max_num_batched_tokens": tokens}


def test_user_settings_win_and_server_steps_stay_short():
    info = lambda util: ("gpu", 59.3)  # noqa: E731
    assert apply_usage_defaults({"max_num_seqs": 8}, OFFLINE, device_info=info) == \
        {"max_num_seqs": 8, "max_num_batched_tokens": 8192}
    assert apply_usage_defaults({"max_num_batched_tokens": None}, SERVER, device_info=info) == \
        {"max_num_seqs": 256, "max_num_batched_tokens": 1024}
    both = {"max_num_seqs": 4, "max_num_batched_tokens": 64}
    assert apply_usage_defaults(both, SERVER, device_info=lambda util: 1 / 0) == both  # no device query needed


def test_multi_process_jobs_are_left_alone():
    kw = {"num_processes": 2}
    assert apply_usage_defaults(kw, OFFLINE, device_info=lambda util: 1 / 0) == kw


def test_unknown_context_is_an_error():
    with pytest.raises(ValueError, match="usage context"):
        usage_defaults("batch", "gpu", 80.0)


def test_the_device_query_leaves_the_allocator_to_the_engine(monkeypatch):
    """The first device query starts XLA's allocator with whatever memory fraction is set then:
    the query must set the engine's gpu_memory_utilization first (else a 0.75 default sticks and
    the KV cache comes out ~20% smaller)."""
    import os

    from jaxserve.usage_defaults import _device_info

    monkeypatch.setenv("XLA_PYTHON_CLIENT_MEM_FRACTION", "unset")  # restored after the test
    monkeypatch.delenv("XLA_PYTHON_CLIENT_MEM_FRACTION")
    seen = {}
    apply_usage_defaults({"gpu_memory_utilization": 0.8}, OFFLINE,
                         device_info=lambda util: seen.setdefault("util", util) and ("cpu", None))
    assert seen["util"] == 0.8
    assert _device_info(0.85)[0] == "cpu" and os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.8500"
