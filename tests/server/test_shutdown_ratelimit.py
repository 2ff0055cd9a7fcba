"""Graceful shutdown (SIGTERM finishes in-flight streams, exits 0) and per-key rate limits (429 with
Retry-After for one key, no effect on another), on a real server process."""
import json
import signal
import threading

import httpx

from tests.server.launch import start_server


def test_rate_limit_and_graceful_shutdown():
    # no warm-up: neither property depends on it, and the one stream compiles just the steps it runs
    proc, base = start_server(["--max-model-len", "256", "--max-num-batched-tokens", "64", "--api-key", "k1,k2",
                               "--rate-limit-rps", "0.5", "--rate-limit-burst", "3", "--shutdown-timeout", "120",
                               "--log-format", "json", "--no-warmup"])
    logs = []
    threading.Thread(target=lambda: logs.extend(proc.stdout), daemon=True).start()
    try:
        h1 = {"Authorization": "Bearer k1"}
        h2 = {"Authorization": "Bearer k2"}
        codes = [httpx.get(base + "/v1/models", headers=h1).status_code for _ in range(5)]
        assert codes[:3] == [200, 200, 200] and codes[3:] == [429, 429]
        r = httpx.get(base + "/v1/models", headers=h1)
        assert r.status_code == 429 and int(r.headers["Retry-After"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
        assert httpx.get(base + "/v1/models", headers=h2).status_code == 200  # other key unaffected

        # A long stream is in flight when SIGTERM arrives: it must finish, then the process exits 0.
        body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}
        chunks = []
        with httpx.stream("POST", base + "/v1/completions", json=body, headers=h2, timeout=300) as resp:
            assert resp.status_code == 200
            for line in resp.iter_lines():
                if not line.startswith("data: "):
                    continue
                chunks.append(line[6:])
                if len(chunks) == 2:
                    proc.send_signal(signal.SIGTERM)
        assert chunks[-1] == "[DONE]"
        texts = [json.loads(c)["choices"][0] for c in chunks[:-1] if json.loads(c).get("choices")]
        assert texts[-1]["finish_reason"] == "length"
        assert proc.wait(timeout=120) == 0
        with_fields = [json.loads(l) for l in logs if l.startswith("{") and '"request_id"' in l]
        assert with_fields and all("prompt" not in rec for rec in with_fields)  # no prompt text by default
        assert any(rec.get("output_tokens") == 40 for rec in with_fields)
    finally:
        if proc.poll() is None:
            proc.kill()
