"""4-bit AWQ / GPTQ weights: the checkpoint formats (packed here by AutoAWQ's and AutoGPTQ's
packing rules, written out independently of jaxserve's unpacking), `int4.linear` on both paths,
and the real SmolLM2 written as AWQ / GPTQ checkpoints against HF transformers running the same
weights widened to float32 (the kernel itself: tests/pallas_kernels/test_int4_matmul.py)."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from jaxserve.models import int4
from jaxserve.models.loader import _reconcile

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column 8c + AWQ_ORDER[i]


def pack_awq(vals):
    """[R, N] values 0..15 -> [R, N/8] int32 the way AutoAWQ's WQLinear_GEMM packs qweight and qzeros."""
    r, n = vals.shape
    out = np.zeros((r, n // 8), np.uint32)
    for col in range(n // 8):
        for i in range(8):
            out[:, col] |= vals[:, col * 8 + AWQ_ORDER[i]].astype(np.uint32) << np.uint32(4 * i)
    return out.view(np.int32)


def pack_gptq_rows(vals):
    """[K, N] -> [K/8, N] int32: AutoGPTQ's qweight, row 8r + j in bits 4j.."""
    k, n = vals.shape
    out = np.zeros((k // 8, n), np.uint32)
    for j in range(8):
        out |= vals[j::8].astype(np.uint32) << np.uint32(4 * j)
    return out.view(np.int32)


def pack_gptq_cols(vals):
    """[R, N] -> [R, N/8] int32: AutoGPTQ's qzeros, column 8c + j in bits 4j.."""
    r, n = vals.shape
    out = np.zeros((r, n // 8), np.uint32)
    for j in range(8):
        out |= vals[:, j::8].astype(np.uint32) << np.uint32(4 * j)
    return out.view(np.int32)


def rtn(w, groups_of_rows, sym=False):
    """w [K, N] float -> (q [K, N], s [G, N] float16, z [G, N]) per group of rows (a list of row
    index arrays), round to nearest; sym: zero point 8 (GPTQ's symmetric mode)."""
    q = np.zeros(w.shape, np.int64)
    s = np.zeros((len(groups_of_rows), w.shape[1]), np.float16)
    z = np.zeros(s.shape, np.int64)
    for g, rows in enumerate(groups_of_rows):
        blk = w[rows]
        if sym:
            sc = np.maximum(np.abs(blk).max(0), 1e-8) / 7.5
            zp = np.full(w.shape[1], 8)
        else:
            lo, hi = blk.min(0), blk.max(0)
            sc = np.maximum(hi - lo, 1e-8) / 15
            zp = np.clip(np.round(-lo / sc), 0, 15).astype(np.int64)
        s[g] = sc.astype(np.float16)
        sc16 = s[g].astype(np.float64)
        q[rows] = np.clip(np.round(blk / sc16) + zp, 0, 15)
        z[g] = zp
    return q, s, z


def widen(q, s, z, g_idx):
    return ((q - z[g_idx]) * s.astype(np.float64)[g_idx]).astype(np.float32)


# ---- formats ---------------------------------------------------------------------------------
def test_awq_tensors_unpack_to_the_values_packed():
    rng = np.random.default_rng(0)
    q = rng.integers(0, 16, (256, 96))
    z = rng.integers(0, 16, (2, 96))
    s = rng.uniform(0.01, 0.1, (2, 96)).astype(np.float16)
    d = int4.from_awq(pack_awq(q), pack_awq(z), s)
    assert np.array_equal(d["q4"], q) and np.array_equal(d["z"], z) and np.array_equal(d["s"], s.astype(np.float32))


@pytest.mark.parametrize("fmt", ["gptq", "gptq_v2"])
def test_gptq_tensors_unpack_to_the_values_packed(fmt):
    rng = np.random.default_rng(1)
    q = rng.integers(0, 16, (256, 64))
    z = rng.integers(1, 16, (2, 64))
    offset = 1 if fmt == "gptq" else 0
    s = rng.uniform(0.01, 0.1, (2, 64)).astype(np.float16)
    g_idx = np.arange(256) // 128
    d = int4.from_gptq(pack_gptq_rows(q), pack_gptq_cols(z - offset), s, g_idx, zero_offset=offset)
    assert np.array_equal(d["q4"], q) and np.array_equal(d["z"], z)


def test_gptq_act_order_is_widened_with_its_group_index():
    rng = np.random.default_rng(2)
    q = rng.integers(0, 16, (256, 32))
    z = rng.integers(1, 16, (4, 32))
    s = rng.uniform(0.01, 0.1, (4, 32)).astype(np.float16)
    g_idx = rng.permutation(np.arange(256) // 64)
    d = int4.from_gptq(pack_gptq_rows(q), pack_gptq_cols(z - 1), s, g_idx)
    assert set(d) == {"w"}
    np.testing.assert_allclose(d["w"], widen(q, s, z, g_idx), rtol=1e-6)


def test_device_quantize_rounds_to_nearest():
    rng = np.random.default_rng(3)
    w = jnp.asarray(rng.standard_normal((256, 2, 16)).astype(np.float32))
    qw = int4.quantize(w, group=64)
    assert qw["qw"].shape == (32, 2, 16) and qw["s"].shape == (4, 2, 16)
    err = np.abs(np.asarray(int4.dequantize(qw)) - np.asarray(w))
    assert err.max() <= np.asarray(qw["s"]).max() / 2 + 1e-6  # half a step at most


def test_linear_on_a_stacked_weight_both_paths():
    rng = np.random.default_rng(5)
    w = jnp.asarray(rng.standard_normal((256, 2, 32)).astype(np.float32) * 0.05)
    qw = int4.quantize(w, group=128)
    x = jnp.asarray(rng.standard_normal((3, 256)).astype(np.float32))
    want = np.einsum("tk,kab->tab", np.asarray(x, np.float64), np.asarray(int4.dequantize(qw), np.float64))
    for kernel in (True, False):
        got = np.asarray(int4.linear(x, qw, kernel=kernel))
        assert got.shape == (3, 2, 32)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # the large-step paths (widen.py's pass, XLA's widening) give the same bits
    xb = x.astype(jnp.bfloat16)
    qb = {k: (v.astype(jnp.bfloat16) if k != "qw" else v) for k, v in qw.items()}
    np.testing.assert_array_equal(np.asarray(int4.linear(xb, qb, kernel=False, widen=True), np.float32),
                                  np.asarray(int4.linear(xb, qb, kernel=False, widen=False), np.float32))


def test_rows_layout_moves_weights_to_the_kernels_layout(monkeypatch):
    """with_rows (one Hopper GPU, or JAXSERVE_INT4_ROWS) moves every 4-bit weight to mgpu.py's layout of the
    same values; `linear` on it equals `linear` on the words (XLA's widening, and widen_rows' pass
    against widen.py's, bit for bit); rows_config reads the kernel's options."""
    import types

    from pallas_kernels.int4_matmul import mgpu

    rng = np.random.default_rng(6)
    w = jnp.asarray(rng.standard_normal((256, 2, 128)).astype(np.float32) * 0.05)
    qw = {k: v.astype(jnp.bfloat16) if k != "qw" else v for k, v in int4.quantize(w, group=128).items()}
    params = {"layers": [{"w_gate_up": qw, "norm": jnp.ones(4)}]}
    out = int4.with_rows(params)
    assert int4.layout(params) == "words" and int4.layout(out) == "rows" and int4.layout({"w": w}) is None
    layer = {"wq": qw, "wk": w}  # a layer's dict: its q projection is named "wq" too
    assert not int4.is_int4(layer) and int4.layout({"layers": [layer]}) == "words"
    rows = out["layers"][0]["w_gate_up"]
    assert out["layers"][0]["norm"] is params["layers"][0]["norm"] and int4.is_int4(rows)
    assert set(rows) == {"wq", "zs"} and rows["wq"].shape == (2, 128, 256) and rows["zs"].shape == (2, 2, 2, 128)
    wq, zs = mgpu.to_rows(qw["qw"], qw["s"], qw["z"], order=mgpu.load_order(int4.DEFAULT_LOAD))
    np.testing.assert_array_equal(np.asarray(rows["wq"].reshape(256, 256), np.float32), np.asarray(wq, np.float32))
    x = jnp.asarray(rng.standard_normal((3, 256))).astype(jnp.bfloat16)
    got, want = int4.linear(x, rows, widen=False), int4.linear(x, qw, kernel=False, widen=False)
    assert got.shape == want.shape == (3, 2, 128)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), rtol=1e-2, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(int4.linear(x, rows, widen=True), np.float32),
                                  np.asarray(int4.linear(x, qw, kernel=False, widen=True), np.float32))
    with pytest.raises(ValueError, match="one device"):
        int4.linear(x, rows, mesh=types.SimpleNamespace(shape={"model": 2}))
    odd = {k: v.astype(jnp.bfloat16) if k != "qw" else v for k, v in int4.quantize(w[:, :, :96], group=128).items()}
    kept = int4.with_rows({"w": odd})["w"]  # N = 192 is not a multiple of 128: the words stay
    assert set(kept) == {"qw", "s", "z"} and kept["qw"] is odd["qw"]
    mine = {k: jnp.array(v) for k, v in qw.items()}
    freed = int4.with_rows({"w": mine}, free=True)["w"]  # the loader's form: the words are given back
    assert all(mine[k].is_deleted() for k in mine)
    np.testing.assert_array_equal(np.asarray(freed["wq"], np.float32), np.asarray(rows["wq"], np.float32))
    monkeypatch.setenv(int4.ROWS_ENV, "1")  # per shape: every Llama-3-8B projection valid for the kernel
    for n, k in ((6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336)):
        cfg = int4.rows_config((n, k), k // 128)
        assert mgpu.supported(16, k, n, k // 128, cfg["wgs"]), (n, k, cfg)
        assert mgpu.valid_split(k, k // 128, cfg["splits"], cfg["tk"]), (n, k, cfg)
    assert int4.rows_config((28672, 4096), 32)["tk"] == 512 and int4.rows_config((4096, 4096), 32)["tk"] == 256
    cfg_gate_up = int4.rows_config((28672, 4096), 32)
    assert int4.rows_config((6144, 4096), 32)["wgs"] == 3 and int4.rows_config((4096, 4096), 32)["wgs"] == 2
    assert cfg_gate_up["load"] == int4.DEFAULT_LOAD
    monkeypatch.setenv(int4.ROWS_ENV, "wgmma")  # a load alone: the per-shape options with it
    assert int4.rows_config((28672, 4096), 32) == {**cfg_gate_up, "load": "wgmma"}
    monkeypatch.setenv(int4.ROWS_ENV, "512,3,cover,3")
    cfg = int4.rows_config((6144, 4096), 32)
    assert cfg["tk"] == 512 and cfg["stages"] == 3 and cfg["wgs"] == 3 and cfg["load"] == int4.DEFAULT_LOAD
    fitted = int4.rows_config((4096, 1280), 10)  # one setting fitted: N % 192 -> 2 warpgroups; K 1280 -> 256
    assert fitted["wgs"] == 2 and fitted["tk"] == 256 and mgpu.supported(16, 1280, 4096, 10, fitted["wgs"])
    assert mgpu.valid_split(4096, 32, cfg["splits"], 512)
    for bad in ("256,4", "256,4,sideways,2", "x,4,cover,2", "256,4,cover,2,nope"):
        monkeypatch.setenv(int4.ROWS_ENV, bad)
        with pytest.raises(ValueError, match="tk,stages,fill,wgs"):
            int4.rows_config((6144, 4096), 32)


def test_the_rows_layout_is_the_default_on_one_hopper_gpu_only(monkeypatch):
    monkeypatch.delenv(int4.ROWS_ENV, raising=False)
    assert not int4.rows_enabled()  # the CPU
    monkeypatch.setattr(int4.jax, "default_backend", lambda: "gpu")
    for hopper, env, sharded, want in ((True, None, False, True), (True, "0", False, False), (True, None, True, False),
                                       (False, None, False, False), (False, "1", False, True),
                                       (False, "256,4,one_wave,2", False, True), (True, "1", True, False)):
        monkeypatch.setattr(int4, "_hopper", lambda h=hopper: h)
        if env is None:
            monkeypatch.delenv(int4.ROWS_ENV, raising=False)
        else:
            monkeypatch.setenv(int4.ROWS_ENV, env)
        assert int4.rows_enabled(sharded=sharded) is want, (hopper, env, sharded)


# ---- configs and errors ----------------------------------------------------------------------
def test_checkpoint_format_reads_configs_and_refuses_what_it_cannot():
    awq = int4.checkpoint_format({"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 128,
                                                          "version": "gemm", "zero_point": True}})
    assert awq == int4.CheckpointFormat("awq", 128)
    gptq = int4.checkpoint_format({"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": -1,
                                                           "desc_act": True}})
    assert gptq == int4.CheckpointFormat("gptq", -1, zero_offset=1, act_order=True)
    assert int4.checkpoint_format({}) is None
    bad = [({"quant_method": "gptq", "bits": 8}, "8-bit"), ({"quant_method": "awq", "version": "gemv"}, "gemv"),
           ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "marlin"),
           ({"quant_method": "bitsandbytes"}, "bitsandbytes")]
    for qc, words in bad:
        with pytest.raises(ValueError, match=words):
            int4.checkpoint_format({"quantization_config": qc})
    with pytest.raises(ValueError, match="not quantized"):
        _reconcile("awq", None, "some/model")
    with pytest.raises(ValueError, match="--quantization gptq"):
        _reconcile("awq", gptq, "some/model")
    assert _reconcile(None, awq, "m") == "awq" and _reconcile(None, None, "m") is None


def test_old_autoawq_quant_config_json(tmp_path):
    (tmp_path / "quant_config.json").write_text(json.dumps({"w_bit": 4, "q_group_size": 64, "zero_point": True,
                                                            "version": "GEMM"}))
    assert int4.checkpoint_format({}, str(tmp_path)) == int4.CheckpointFormat("awq", 64)


def test_incomplete_projection_is_named():
    fmt = int4.CheckpointFormat("awq", 128)
    with pytest.raises(ValueError, match="q_proj"):
        list(int4.checkpoint_tensors(iter([("model.layers.0.self_attn.q_proj.qweight", np.zeros((8, 1), np.int32))]),
                                     fmt))


# ---- the real model, written in each format --------------------------------------------------
PROJ = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
        "mlp.up_proj", "mlp.down_proj")


@pytest.fixture(scope="module")
def smol(smollm2_hf, smollm2_hf_tokenizer):
    return smollm2_hf, smollm2_hf_tokenizer  # (tests/conftest.py: loaded once per session, shared)


def _write_quantized(hf, tok, out_dir, fmt):
    """SmolLM2 as an AWQ / GPTQ checkpoint (round to nearest, groups of 64); returns the HF model
    with every projection set to its widened 4-bit values (the oracle)."""
    import copy

    import torch
    from safetensors.numpy import save_file

    model = copy.deepcopy(hf)
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    tensors = {k: v for k, v in sd.items() if not any(p in k for p in PROJ) and k != "lm_head.weight"}
    rng = np.random.default_rng(7)
    g = 64
    for name in [k for k in sd if any(p + ".weight" in k for p in PROJ)]:
        w = sd[name].T.astype(np.float64)  # [in, out]
        k = w.shape[0]
        mod = name[: -len(".weight")]
        if fmt == "gptq_act_order":
            g_idx = rng.permutation(np.arange(k) // g)
        else:
            g_idx = np.arange(k) // g
        q, s, z = rtn(w, [np.where(g_idx == i)[0] for i in range(k // g)], sym=fmt.startswith("gptq"))
        if fmt == "awq":
            tensors.update({mod + ".qweight": pack_awq(q), mod + ".qzeros": pack_awq(z), mod + ".scales": s})
        else:
            tensors.update({mod + ".qweight": pack_gptq_rows(q), mod + ".qzeros": pack_gptq_cols(z - 1),
                            mod + ".scales": s, mod + ".g_idx": g_idx.astype(np.int32)})
        with torch.no_grad():
            model.get_parameter(name).copy_(torch.from_numpy(widen(q, s, z, g_idx).T.copy()))
    os.makedirs(out_dir, exist_ok=True)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    cfg = model.config.to_dict()
    cfg["quantization_config"] = ({"quant_method": "awq", "bits": 4, "group_size": g, "version": "gemm",
                                   "zero_point": True} if fmt == "awq" else
                                  {"quant_method": "gptq", "bits": 4, "group_size": g, "sym": True,
                                   "desc_act": fmt == "gptq_act_order"})
    cfg["architectures"] = ["LlamaForCausalLM"]
    with open(os.path.join(out_dir, "config.json"), "w") as fh:
        json.dump(cfg, fh)
    tok.save_pretrained(out_dir)
    return model


@pytest.mark.parametrize("fmt", ["awq", "gptq", "gptq_act_order"])
def test_smollm2_quantized_checkpoint_matches_hf_on_the_same_weights(tmp_path, smol, fmt):
    from jaxserve import LLM, SamplingParams
    from tests.test_generate_e2e import PROMPTS, _hf_greedy

    hf, tok = smol
    oracle = _write_quantized(hf, tok, str(tmp_path / fmt), fmt)
    # no warm-up: the 4 prompts compile just the steps they run (warm-up's other buckets and
    # sampler variants are not what this test checks)
    llm = LLM(model=str(tmp_path / fmt), dtype="float32", max_model_len=256, max_num_seqs=4,
              max_num_batched_tokens=64, seed=0, warmup=False)
    eng = llm.llm_engine
    assert eng.model.quantization == ("awq" if fmt == "awq" else "gptq")
    w = eng.model.params["layers"][0]["w_down"]
    if fmt == "gptq_act_order":
        assert not isinstance(w, dict)  # act order: widened while loading
    else:
        assert w["qw"].dtype == jnp.int32 and w["qw"].shape == (1536 // 8, 576)  # 4 bits per weight
    ids = [tok.encode(p) for p in PROMPTS[:4]]
    outs = llm.generate([{"prompt_token_ids": i} for i in ids],
                        SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for i, out in zip(ids, outs):
        assert out.outputs[0].token_ids == _hf_greedy(oracle, i, 16), tok.decode(i)


def test_only_a_mesh_that_splits_weights_counts_as_tensor_parallel():
    """llama._tp_mesh: the mesh the 4-bit kernel runs per shard on (tests/parallel runs it)."""
    from types import SimpleNamespace

    from jaxserve.models import llama
    from jaxserve.models.attention import AttentionBackend

    assert llama._tp_mesh("reference") is None and llama._tp_mesh(AttentionBackend("pallas")) is None
    assert llama._tp_mesh(SimpleNamespace(mesh=SimpleNamespace(shape={"model": 1, "stage": 2}))) is None
    tp = SimpleNamespace(shape={"model": 3})
    assert llama._tp_mesh(SimpleNamespace(mesh=tp)) is tp
    with pytest.raises(ValueError, match="split"):
        int4.linear(jnp.zeros((1, 128)), int4.quantize(jnp.ones((128, 32))), mesh=tp)


def _tiny_awq():
    """The tiny dummy model in 4 bits (float32 activations) -> (its layer-0 params, 6 greedy tokens)."""
    from jaxserve import LLM, SamplingParams

    llm = LLM(model="tiny", load_format="dummy", quantization="awq", dtype="float32", max_model_len=128,
              max_num_seqs=2, max_num_batched_tokens=64, warmup=False)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    out = llm.generate({"prompt_token_ids": [1, 2, 3]}, greedy, use_tqdm=False)[0]
    return llm.llm_engine.model.params["layers"][0], out.outputs[0].token_ids


PROJECTIONS = ("wq", "wk", "wv", "wo", "w_gate_up", "w_down")
ENGINE_PROJECTIONS = ("w_qkv", "wo", "w_gate_up", "w_down")  # q, k, v fused on one device (llama.fuse_qkv)


@pytest.fixture(scope="module")
def tiny_awq():
    return _tiny_awq()


def test_dummy_weights_in_four_bits_and_their_footprint(tiny_awq):
    """--load-format dummy --quantization awq (the GPU benchmarks' 4-bit model): every layer
    projection is rounded to 4 bits as it is made, generation runs, and the footprint counts a
    quarter of the bf16 bytes plus scales and zeros."""
    from jaxserve.models import footprint, llama, loader

    lp, tokens = tiny_awq
    assert all(int4.is_int4(lp[k]) and "qw" in lp[k] for k in ENGINE_PROJECTIONS)
    assert len(tokens) == 6
    arch = llama.LlamaConfig.from_hf_config(dict(loader.DUMMY_SHAPES["llama-3-8b"]))
    shapes = llama.param_shapes(arch)
    bf16, q4 = footprint.weight_bytes(shapes, jnp.bfloat16), footprint.weight_bytes(shapes, jnp.bfloat16, "awq")
    proj = sum(np.prod(s) for name, s in shapes["layers"][0].items() if name in PROJECTIONS) * arch.num_layers
    assert bf16 - q4 == 2 * proj - (proj // 2 + 2 * 2 * proj // 128)


@pytest.mark.parametrize("spec", ["1", "wgmma"])
def test_the_rows_layout_generates_what_the_words_do(monkeypatch, tiny_awq, spec):
    """The rows layout's loader step on the whole model (forced on the CPU, where `linear` takes its
    XLA path): every projection moved, the same greedy tokens; in either storage order."""
    _, words = tiny_awq
    monkeypatch.setenv(int4.ROWS_ENV, spec)
    monkeypatch.setattr(int4, "rows_enabled", lambda sharded=False: not sharded)
    monkeypatch.setattr(int4.mgpu, "supported", lambda *a, **k: True)  # the tiny model's 64 columns: convert all
    lp, rows = _tiny_awq()
    assert all(set(lp[k]) == {"wq", "zs"} for k in ENGINE_PROJECTIONS)
    assert rows == words


def test_fused_4bit_qkv_is_the_three_projections_side_by_side(tiny_awq):
    """llama.fuse_qkv on 4-bit weights (one device): w_qkv's product is q, k and v's products
    in fuse_qkv's [Hkv, G+2, D] order, and the engine without the fusion emits the same tokens."""
    from jaxserve.models import llama, loader

    arch = llama.LlamaConfig.from_hf_config(dict(loader.DUMMY_SHAPES["tiny"]))
    rng = np.random.default_rng(3)
    E, D, hkv = arch.hidden_size, arch.head_dim, arch.num_kv_heads
    g = arch.num_heads // hkv
    members = {n: int4.quantize(jnp.asarray(rng.standard_normal((E, c)).astype(np.float32) * 0.05), group=32)
               for n, c in (("wq", hkv * g * D), ("wk", hkv * D), ("wv", hkv * D))}
    fused = llama.fuse_qkv({"layers": [dict(members, wo=None)]}, arch)["layers"][0]
    given = {n: {m: jnp.array(a) for m, a in w.items()} for n, w in members.items()}
    freed = llama.fuse_qkv({"layers": [dict(given, wo=None)]}, arch, free=True)["layers"][0]  # the engine's form
    assert all(a.is_deleted() for w in given.values() for a in w.values())
    np.testing.assert_array_equal(np.asarray(freed["w_qkv"]["qw"]), np.asarray(fused["w_qkv"]["qw"]))
    assert "wq" not in fused and fused["w_qkv"]["qw"].shape == (E // 8, hkv, g + 2, D)
    x = jnp.asarray(rng.standard_normal((3, E)).astype(np.float32))
    got = np.asarray(int4.linear(x, fused["w_qkv"], kernel=False, widen=False))
    q, k, v = (np.asarray(int4.linear(x, members[n], kernel=False, widen=False)) for n in ("wq", "wk", "wv"))
    np.testing.assert_allclose(got[:, :, :g].reshape(3, -1), q, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, :, g].reshape(3, -1), k, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got[:, :, g + 1].reshape(3, -1), v, rtol=1e-5, atol=1e-6)

    _, tokens = tiny_awq
    original = llama.fuse_qkv
    llama.fuse_qkv = lambda params, cfg, free=False: params
    try:
        lp, unfused = _tiny_awq()
    finally:
        llama.fuse_qkv = original
    assert "wq" in lp and unfused == tokens


def test_zero_biases_of_an_exporter_are_skipped_and_real_ones_refused():
    """Some GPTQ exporters write an all-zero bias for every projection of a Llama (which has none)."""
    from jaxserve.models import llama
    from jaxserve.models.loader import build_params

    arch = llama.LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                             num_kv_heads=1, head_dim=8)
    rng = np.random.default_rng(0)
    tensors = [(n, rng.standard_normal(s).astype(np.float32)) for n, s in [
        ("model.embed_tokens.weight", (16, 16)), ("model.norm.weight", (16,)), ("lm_head.weight", (16, 16)),
        ("model.layers.0.input_layernorm.weight", (16,)), ("model.layers.0.post_attention_layernorm.weight", (16,)),
        ("model.layers.0.self_attn.q_proj.weight", (16, 16)), ("model.layers.0.self_attn.k_proj.weight", (8, 16)),
        ("model.layers.0.self_attn.v_proj.weight", (8, 16)), ("model.layers.0.self_attn.o_proj.weight", (16, 16)),
        ("model.layers.0.mlp.gate_proj.weight", (32, 16)), ("model.layers.0.mlp.up_proj.weight", (32, 16)),
        ("model.layers.0.mlp.down_proj.weight", (16, 32))]]
    zero = [("model.layers.0.self_attn.q_proj.bias", np.zeros(16, np.float32))]
    params = build_params(arch, iter(tensors + zero), jnp.float32)
    assert "bq" not in params["layers"][0]
    with pytest.raises(ValueError, match="non-zero bias"):
        build_params(arch, iter(tensors + [("model.layers.0.self_attn.q_proj.bias", np.ones(16, np.float32))]),
                     jnp.float32)


@pytest.mark.gpu
@pytest.mark.skipif(not (int4.jax.default_backend() == "gpu" and int4._hopper()),
                    reason="the Mosaic-GPU layout is the default on Hopper GPUs only")
def test_the_hopper_layout_scores_prompts_as_the_words_do_on_the_gpu(tmp_path, monkeypatch):
    """The whole engine on a Hopper GPU, 4-bit Llama of kernel-sized shapes (dummy weights): the
    default layout (the Mosaic-GPU kernel for a 40-token prompt, widen_rows + dot for 300 tokens,
    fused q/k/v) gives each prompt token the log-probability the words layout (Triton kernel,
    widen.py) gives it, within bf16 rounding; a wrong layout would be off by the spread (~0.6)."""
    import gc

    from jaxserve import LLM, SamplingParams

    cfg = dict(architectures=["LlamaForCausalLM"], vocab_size=2048, hidden_size=1024, intermediate_size=2048,
               num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=1024,
               rope_theta=10000.0, rms_norm_eps=1e-5)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg["vocab_size"], n).tolist() for n in (40, 300)]
    scores, layouts = {}, {}
    for arm in ("0", "", "wgmma"):
        monkeypatch.setenv(int4.ROWS_ENV, arm)
        llm = LLM(model=str(tmp_path), load_format="dummy", quantization="awq", dtype="bfloat16", max_model_len=512,
                  max_num_seqs=4, max_num_batched_tokens=512, gpu_memory_utilization=0.3, warmup=False)
        layouts[arm] = int4.layout(llm.llm_engine.model.params)
        scores[arm] = []
        for p in prompts:  # one prompt per step: 40 rows (kernel), then 512 (widening)
            out = llm.generate({"prompt_token_ids": p}, SamplingParams(max_tokens=1, prompt_logprobs=0),
                               use_tqdm=False)[0]
            scores[arm].append(np.array([next(iter(lp.values())).logprob for lp in out.prompt_logprobs[1:]]))
        del llm
        gc.collect()
    assert layouts == {"0": "words", "": "rows", "wgmma": "rows"}
    for arm in ("", "wgmma"):
        for words, rows in zip(scores["0"], scores[arm]):
            assert words.std() > 0.3  # the comparison can fail
            assert np.abs(words - rows).max() < 0.1, (arm, np.abs(words - rows).max())
