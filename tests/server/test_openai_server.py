"""A real server process on 127.0.0.1 with the default model, driven by the official openai client."""
import asyncio
import json
import re
import subprocess
import time

import httpx
import pytest

from tests.server.launch import start_server

openai = pytest.importorskip("openai")

API_KEY = "test-key"


@pytest.fixture(scope="module")
def server():
    proc, base = start_server(["--max-model-len", "512", "--max-num-seqs", "32", "--max-num-batched-tokens", "128",
                               "--api-key", API_KEY, "--seed", "0",
                               # every test also runs with n-gram speculation on (requests with
                               # logprobs, penalties or stop strings never propose)
                               "--speculative-model", "[ngram]", "--num-speculative-tokens", "3"], vllm_spelling=True)
    yield base
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=API_KEY)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


def _metric(base, name):
    text = httpx.get(base + "/metrics").text
    m = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1))


def test_models_and_completion(client, model):
    assert model == "SmolLM2-135M-Instruct"
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=8, temperature=0)
    assert r.choices[0].text.strip().startswith("Paris")
    assert r.usage.prompt_tokens == 5 and r.usage.completion_tokens == len(r.choices[0].text) * 0 + r.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_streaming_joins_to_non_streamed(client, model):
    full = client.completions.create(model=model, prompt="Once upon a time", max_tokens=24, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=model, prompt="Once upon a time", max_tokens=24, temperature=0, stream=True) if c.choices]
    assert len(pieces) > 3 and "".join(pieces) == full.choices[0].text
    msgs = [{"role": "user", "content": "Name three colours."}]
    chat = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0)
    stream = client.chat.completions.create(model=model, messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens


def test_n_stop_logprobs(client, model):
    r = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=1.0, n=2,
                                  seed=3)
    assert len(r.choices) == 2 and {c.index for c in r.choices} == {0, 1}
    base = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0)
    word = base.choices[0].text.split()[1]
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=12, temperature=0,
                                  stop=[word])
    assert r.choices[0].finish_reason == "stop" and word not in r.choices[0].text
    r = client.completions.create(model=model, prompt="The capital of France is", max_tokens=4, temperature=0,
                                  logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and all(len(t) >= 3 for t in lp.top_logprobs)
    assert all(v <= 0 for v in lp.token_logprobs)
    c = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4,
                                       temperature=0, logprobs=True, top_logprobs=2)
    assert len(c.choices[0].logprobs.content) == 4
    assert all(len(t.top_logprobs) == 2 for t in c.choices[0].logprobs.content)


def test_errors_are_openai_shaped_and_server_keeps_serving(server, client, model):
    h = {"Authorization": f"Bearer {API_KEY}"}
    cases = [
        (b"{not json", 400), (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400),
        (json.dumps({"prompt": "x", "temperature": -1}).encode(), 400),
        (json.dumps({"prompt": "x", "top_p": 0}).encode(), 400),
        (json.dumps({"prompt": "x", "model": "nope"}).encode(), 404),
        (json.dumps({"prompt": "hello " * 600, "max_tokens": 4}).encode(), 400),
        (json.dumps({"prompt": [1, "a"]}).encode(), 400),
    ]
    for body, status in cases:
        r = httpx.post(server + "/v1/completions", content=body, headers={**h, "content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in err["message"]
    r = httpx.post(server + "/v1/completions", json={"prompt": "hello " * 600}, headers=h)
    assert "512" in r.json()["error"]["message"]
    assert httpx.post(server + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.post(server + "/v1/completions", json={"prompt": "x"},
                      headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.completions.create(model=model, prompt="Still alive?", max_tokens=2).choices


def test_structured_outputs_and_tools_are_refused_not_ignored(client, model):
    """Asked for JSON mode, a schema, guided decoding or tools, the server says it cannot (400
    naming the field) rather than answering as if they had not been asked; the no-op forms pass."""
    msgs = [{"role": "user", "content": "Give me a JSON object."}]
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    refused = [dict(response_format={"type": "json_object"}),
               dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}),
               dict(tools=[tool]), dict(tools=[tool], tool_choice="auto"),
               dict(extra_body={"guided_json": {"type": "object"}}), dict(extra_body={"guided_choice": ["a", "b"]})]
    for kw in refused:
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=model, messages=msgs, max_tokens=4, **kw)
        field = next(iter(kw.get("extra_body", kw)))
        assert e.value.body["param"] == field and "not supported" in e.value.body["message"], kw
    for kw in (dict(response_format={"type": "text"}), dict(tools=[tool], tool_choice="none")):
        assert client.chat.completions.create(model=model, messages=msgs, max_tokens=4, **kw).choices
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=4, extra_body={"guided_regex": "[a-z]+"})


def test_tokenize_detokenize_version_health(server):
    h = {"Authorization": f"Bearer {API_KEY}"}
    t = httpx.post(server + "/tokenize", json={"prompt": "Hello world"}, headers=h).json()
    assert t["count"] == len(t["tokens"]) > 0
    d = httpx.post(server + "/detokenize", json={"tokens": t["tokens"]}, headers=h).json()
    assert d["prompt"] == "Hello world"
    assert httpx.get(server + "/version").json()["version"]
    assert httpx.get(server + "/health").status_code == 200
    schema = httpx.get(server + "/openapi.json").json()
    assert "/v1/completions" in schema["paths"] and "/v1/chat/completions" in schema["paths"]


def test_64_concurrent_streams_and_disconnect_frees_blocks(server, model):
    async def one(i, ac, cut=False):
        body = {"model": model, "prompt": f"Story number {i}:", "max_tokens": 12, "temperature": 0.7, "seed": i,
                "stream": True}
        n = 0
        async with ac.stream("POST", server + "/v1/completions", json=body,
                             headers={"Authorization": f"Bearer {API_KEY}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    n += 1
                    if cut and n == 2:
                        return "cut"
                    if line == "data: [DONE]":
                        return "done"
        return "eof"

    async def run():
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(timeout=300, limits=limits) as ac:
            cut = asyncio.create_task(one(999, ac, cut=True))
            res = await asyncio.gather(*[one(i, ac) for i in range(64)])
            return res, await cut

    res, cut = asyncio.run(run())
    assert res == ["done"] * 64 and cut == "cut"
    deadline = time.time() + 30
    while time.time() < deadline and _metric(server, "jaxserve:kv_cache_usage_perc") > 0:
        time.sleep(0.5)
    assert _metric(server, "jaxserve:kv_cache_usage_perc") == 0.0
    assert _metric(server, "jaxserve:num_requests_running") == 0.0
    assert _metric(server, "jaxserve:request_success_total") >= 64


def test_schema_fuzz_finds_no_5xx(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, settings

    schema = schemathesis.openapi.from_url(server + "/openapi.json")
    failures = []
    for op in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"):
        strategy = schema[op]["POST"].as_strategy()

        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
        def check(case):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
            body = case.body
            if isinstance(body, dict):  # keep generation short on a CPU; every other field is fuzzed
                for k in ("max_tokens", "max_completion_tokens"):
                    if not isinstance(body.get(k), int) or body[k] > 4:
                        body[k] = 4
                if isinstance(body.get("n"), int) and body["n"] > 2:
                    body["n"] = 2
            r = httpx.request(case.method, server + case.formatted_path, json=body, headers=case.headers, timeout=60)
            if r.status_code >= 500:
                failures.append((op, body, r.status_code, r.text[:200]))

        from hypothesis import given
        given(strategy)(check)()
    assert not failures, failures[:3]


def test_speculation_streams_what_it_returns(server, client, model):
    """A prompt that repeats itself: proposals are accepted (several tokens a step), and the
    streamed pieces join to the text of the same request not streamed."""
    prompt = "red, green, blue, red, green, blue, red, green, blue, red, green,"
    d0, a0 = _metric(server, "jaxserve:spec_decode_num_draft_tokens_total"), \
        _metric(server, "jaxserve:spec_decode_num_accepted_tokens_total")
    full = client.completions.create(model=model, prompt=prompt, max_tokens=30, temperature=0)
    pieces = [c.choices[0].text for c in client.completions.create(
        model=model, prompt=prompt, max_tokens=30, temperature=0, stream=True) if c.choices]
    assert "".join(pieces) == full.choices[0].text and full.usage.completion_tokens == 30
    drafts = _metric(server, "jaxserve:spec_decode_num_draft_tokens_total") - d0
    accepted = _metric(server, "jaxserve:spec_decode_num_accepted_tokens_total") - a0
    assert 0 < accepted <= drafts


def test_predicted_outputs(server, client, model):
    """OpenAI's `prediction`: the same reply, with the predicted text's tokens proposed and accepted."""
    msgs = [{"role": "user", "content": "Write two sentences about the sea."}]
    first = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0)
    text = first.choices[0].message.content
    a0 = _metric(server, "jaxserve:spec_decode_num_accepted_tokens_total")
    again = client.chat.completions.create(model=model, messages=msgs, max_tokens=40, temperature=0,
                                           extra_body={"prediction": {"type": "content",
                                                                      "content": [{"type": "text", "text": text}]}})
    assert again.choices[0].message.content == text
    assert _metric(server, "jaxserve:spec_decode_num_accepted_tokens_total") - a0 >= 20
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=msgs, max_tokens=4,
                                       extra_body={"prediction": {"type": "file", "content": "x"}})
    assert e.value.body["param"] == "prediction"


def test_bench_serve_against_the_server(server, capsys, tmp_path):
    """`jaxserve bench serve` (Poisson arrivals, streamed) runs against a live server on the
    default model and counts exactly the tokens the server reports generating; vLLM's flag names,
    percentiles, goodput and --save-result work the same way."""
    from jaxserve.cli import main

    before = _metric(server, "jaxserve:generation_tokens_total")
    assert main(["bench", "serve", "--base-url", server, "--api-key", API_KEY, "--num-prompts", "6",
                 "--dataset-name", "random", "--random-input-len", "16", "--random-output-len", "8",
                 "--request-rate", "20", "--max-concurrency", "4", "--vocab-size", "49152", "--max-model-len", "512",
                 "--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,90,99",
                 "--goodput", "e2el:600000", "--save-result", "--result-dir", str(tmp_path / "runs"),
                 "--result-filename", "r.json", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["completed"] == 6 and res["failed"] == 0, res["first_error"]
    assert round(res["output_tokens_per_s"] * res["duration_s"]) == 6 * 8
    assert _metric(server, "jaxserve:generation_tokens_total") - before == 6 * 8
    assert 0 < res["ttft_ms_median"] == res["ttft_ms_p50"] <= res["ttft_ms_p90"] <= res["ttft_ms_p99"]
    assert res["tpot_ms_median"] > 0 and res["e2el_ms_p50"] >= res["ttft_ms_p50"]  # each e2e >= its ttft
    assert res["good_requests"] == 6 and res["request_goodput"] == res["requests_per_s"]  # a 10-minute SLO
    saved = json.loads((tmp_path / "runs" / "r.json").read_text())
    assert {k: saved[k] for k in res} == res and saved["input_len"] == 16 and saved["base_url"] == server
    # bad settings are refused before any request is sent
    assert main(["bench", "serve", "--base-url", server, "--goodput", "ttft=5"]) == 2
    assert "NAME:MILLISECONDS" in capsys.readouterr().err
    assert main(["bench", "serve", "--base-url", server, "--dataset", "sharegpt", "--dataset-path", __file__]) == 2
    assert "--tokenizer" in capsys.readouterr().err


def test_bench_serve_a_sharegpt_file(server, capsys, tmp_path):
    """--dataset sharegpt: the file's first turns, tokenized with the served model's tokenizer,
    are the prompts and its replies' token counts the output lengths the server generates."""
    from jaxserve.cli import main
    from jaxserve.models.loader import default_model_path
    from jaxserve.tokenizer import load_tokenizer

    pairs = [("Tell me a story about a fox.", "Once upon a time a fox lived in the woods."),
             ("What is two plus two?", "Two plus two is four, of course.")]
    path = tmp_path / "sharegpt.json"
    path.write_text(json.dumps([{"conversations": [{"from": "human", "value": p}, {"from": "gpt", "value": r}]}
                                for p, r in pairs]))
    tok = load_tokenizer(default_model_path())
    expected = sum(len(tok.encode(r, add_special_tokens=False)) for _, r in pairs)
    before = _metric(server, "jaxserve:generation_tokens_total")
    assert main(["bench", "serve", "--base-url", server, "--api-key", API_KEY, "--dataset", "sharegpt",
                 "--dataset-path", str(path), "--tokenizer", default_model_path(), "--num-prompts", "2",
                 "--max-model-len", "512", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["completed"] == 2 and round(res["output_tokens_per_s"] * res["duration_s"]) == expected
    assert _metric(server, "jaxserve:generation_tokens_total") - before == expected
