"""On-device sampling: logits processors, greedy / random sampling, logprobs.

Per sequence bucket: with or without penalties (whose token histories are [S, max_model_len]
wide) x with logprobs (sample: top-k with k = max_logprobs) or tokens only (sample_tokens, for the
usual step where nobody asked for logprobs) x mode: greedy / random / filtered (top-k, top-p,
min-p), chosen on the host (sampling_inputs.py); every mode is exact for every row it is given,
"filtered" for all of them. No data-dependent branch: an XLA conditional on GPUs reads its
predicate back to the host, which stalled every step. The runner compiles the variants it uses at
warm-up. Only sampled
token ids and their logprobs go back to the host.

Reproducibility: row i's Gumbel noise is a function of (seed_i, counter_i, token id) only, where
counter_i is the number of tokens that sequence has generated, so a seeded request samples the
same tokens whichever batch it lands in.

Cost (a 1024-row decode step of a 128k vocabulary reads 0.5 GB of float32 logits per pass): the
greedy and random modes are one fused reduction over the logits (the noise is hashed in
registers, not drawn by threefry into memory), and the logit-bias scatter, which makes XLA copy
the logits first, runs only in the modes that have bias entries ("biased", "filtered"). The
filtered mode's top-k / top-p thresholds come from a radix search on GPUs (Pallas from 128 rows:
5.8 ms at 1,024 rows on an H200; XLA ops below) and from a sort per row elsewhere (10.1 ms there).
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxserve.runner.sampling_inputs import MAX_BIAS_ENTRIES, PACKED_FIELDS
from pallas_kernels.filter_thresholds import order_keys
from pallas_kernels.filter_thresholds.kernel import filter_thresholds
from pallas_kernels.filter_thresholds.xla import radix_thresholds

_NEG_INF = -jnp.inf


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingTensors:
    temperature: jax.Array  # [S] f32 (0 -> greedy)
    top_k: jax.Array  # [S] int32 (0 -> off)
    top_p: jax.Array  # [S] f32 (1 -> off)
    min_p: jax.Array  # [S] f32 (0 -> off)
    seeds: jax.Array  # [S] uint32
    counters: jax.Array  # [S] int32 tokens generated so far by the row's sequence
    # logit_bias entries and banned tokens (bias -inf), fixed width W = MAX_BIAS_ENTRIES.
    bias_ids: jax.Array  # [S, W] int32 (-1 padding)
    bias_vals: jax.Array  # [S, W] f32
    # Penalties (all-neutral rows when a request uses none).
    presence: jax.Array  # [S] f32
    frequency: jax.Array  # [S] f32
    repetition: jax.Array  # [S] f32
    prompt_ids: jax.Array  # [S, L] int32 prompt token ids (-1 padding); [S, 0] when no penalties
    output_ids: jax.Array  # [S, L] int32 generated token ids (-1 padding); [S, 0] when no penalties


def unpack_sampling(packed, counters) -> SamplingTensors:
    """SamplingBatch.packed()'s int32 vector [S * (8 + 2W + 2L)] and counters [S] -> the
    SamplingTensors (static slices and bit-casts; L, the penalty history width, follows from
    the length)."""
    S = counters.shape[0]
    fixed = sum(MAX_BIAS_ENTRIES if w == "W" else w for _, _, w in PACKED_FIELDS if w != "L")
    n_hist = sum(w == "L" for _, _, w in PACKED_FIELDS)
    L, rem = divmod(packed.shape[0] // S - fixed, n_hist)
    if rem or L < 0 or packed.shape[0] % S:
        raise ValueError(f"packed sampling arrays of length {packed.shape[0]} do not fit {S} rows")
    fields, o = {}, 0
    for name, dtype, w in PACKED_FIELDS:
        n = {"W": MAX_BIAS_ENTRIES, "L": L}.get(w, w)
        x = packed[o:o + S * n]
        o += S * n
        if dtype != "int32":
            x = jax.lax.bitcast_convert_type(x, jnp.dtype(dtype))
        fields[name] = x if w == 1 else x.reshape(S, n)
    return SamplingTensors(counters=counters, **fields)


def _scatter_rows(shape, ids, vals):
    """Dense [S, V] array with vals[s, j] added at column ids[s, j] (ids == -1 dropped)."""
    s, v = shape
    rows = jnp.broadcast_to(jnp.arange(s)[:, None], ids.shape)
    cols = jnp.where(ids >= 0, ids, v)  # out of range -> dropped
    return jnp.zeros(shape, vals.dtype).at[rows, cols].add(vals, mode="drop")


def _apply_penalties(logits, t: SamplingTensors):
    shape = logits.shape
    out_counts = _scatter_rows(shape, t.output_ids, jnp.ones(t.output_ids.shape, jnp.float32))
    prompt_seen = _scatter_rows(shape, t.prompt_ids, jnp.ones(t.prompt_ids.shape, jnp.float32)) > 0
    seen = prompt_seen | (out_counts > 0)
    rep = t.repetition[:, None]
    # Repetition penalty (as in HF / vLLM): divide positive logits, multiply negative ones.
    logits = jnp.where(seen, jnp.where(logits > 0, logits / rep, logits * rep), logits)
    logits = logits - t.frequency[:, None] * out_counts
    logits = logits - t.presence[:, None] * (out_counts > 0).astype(jnp.float32)
    return logits


def _process(logits, t: SamplingTensors, penalties: bool, bias: bool = True):
    logits = logits.astype(jnp.float32)
    if penalties:
        logits = _apply_penalties(logits, t)
    if not bias:  # the host saw no bias entries in this batch (modes greedy / random)
        return logits
    # logit_bias / banned tokens: a scatter-add of the [S, W] entries into the logits (padding
    # ids -1 are dropped), no dense [S, V] bias array.
    s, v = logits.shape
    rows = jnp.broadcast_to(jnp.arange(s)[:, None], t.bias_ids.shape)
    cols = jnp.where(t.bias_ids >= 0, t.bias_ids, v)
    return logits.at[rows, cols].add(t.bias_vals, mode="drop")


# greedy: every row temperature 0; random: no filters; biased: greedy / random rows with logit_bias
# or banned tokens; filtered: top-k / top-p / min-p or penalties (and bias). Only the last two
# apply the bias entries.
MODES = ("greedy", "random", "biased", "filtered")
# Prompt logprobs are computed this many positions at a time ([rows, vocab] float32 temporaries).
PROMPT_LOGPROB_ROWS = 256
# Speculative decoding checks a step's proposed positions in the smallest of these row counts
# that holds them (each compiled at warm-up when speculation is on); the last bounds a step's.
SPEC_VERIFY_ROWS = (16, 64, PROMPT_LOGPROB_ROWS)


def _choose(logits, t: SamplingTensors, mode: str, penalties: bool, filter_impl: str = "auto"):
    """mode (static, from the host) -> tokens [S] int32: one argmax per row over the processed
    logits, plus (rows with temperature > 0) Gumbel noise after temperature and, in "filtered",
    top-k / top-p / min-p (thresholds by a radix search or a sort). Greedy rows of a random batch
    take the same single reduction with no noise. No data-dependent branch, so the step never
    waits on the device. filter_impl: "auto" (see _filter_impl), "kernel", "xla" or "sort" (tests
    pin one)."""
    if mode not in MODES:
        raise ValueError(f"sampling mode must be one of {MODES}, got {mode!r}")
    processed = _process(logits, t, penalties, bias=mode in ("biased", "filtered"))
    if mode == "greedy":
        return jnp.argmax(processed, axis=-1).astype(jnp.int32)
    hot = t.temperature > 0
    scaled = processed / jnp.where(hot, t.temperature, 1.0)[:, None]
    if mode == "filtered":
        impl = _filter_impl(processed.shape[0]) if filter_impl == "auto" else filter_impl
        if impl in ("kernel", "xla"):
            scaled = jnp.where(_kept_by_thresholds(processed, t, impl), scaled, _NEG_INF)
        else:
            scaled = _filtered(scaled, t)
    z = jnp.where(hot[:, None], scaled + gumbel_noise(t.seeds, t.counters, processed.shape[1]), processed)
    return jnp.argmax(z, axis=-1).astype(jnp.int32)


def _mix32(x):
    """A 32-bit integer finalizer (xorshift-multiply, full avalanche); a bijection of uint32."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def gumbel_noise(seeds, counters, v: int):
    """seeds [S] uint32, counters [S] int32 -> [S, V] float32 standard Gumbel noise.

    Row s's key pair is threefry's fold_in(PRNGKey(seed_s), counter_s) ([S] work); element
    (s, j) is two keyed rounds of a 32-bit mixer over the token id j, so the noise is computed
    inside the argmax's fusion (a dozen integer operations and two logarithms per element)
    instead of threefry writing and the reduction reading [S, V] random bits. Each round is a
    bijection, so a row's V draws are distinct 24-bit uniforms."""
    keys = jax.vmap(lambda sd, c: jax.random.fold_in(jax.random.PRNGKey(sd), c))(seeds, counters)  # [S, 2]
    col = jnp.arange(v, dtype=jnp.uint32)[None, :]
    x = _mix32(_mix32(col ^ keys[:, :1]) + keys[:, 1:])  # [S, V] uint32
    u = ((x >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -jnp.log(-jnp.log(u))


# The radix-search kernel runs one program per row: below this many rows its XLA form, which
# spreads every row over the GPU, is faster (H200, 2026-12-01, ms, sort / XLA form / kernel: 16
# rows 0.52 / 0.21 / 0.87, 64 rows 1.09 / 0.62 / 0.91, 128 rows 1.34 / 2.22 / 0.96; 1,024 rows:
# kernel 5.8 against the sort's 10.1). The kernel's (bits, chunk, num_warps) from each row count
# up: the fastest measured (fifth session, calls 5 and 9 of docs/benchmarks.md; fewer rows, wider
# programs).
FILTER_KERNEL_MIN_ROWS = 128
FILTER_KERNEL_CONFIGS = ((512, dict(bits=2, chunk=1024, num_warps=4)), (256, dict(bits=2, chunk=2048, num_warps=8)),
                         (0, dict(bits=2, chunk=4096, num_warps=16)))


def _filter_impl(rows: int) -> str:
    """The top-k / top-p implementation for a batch of `rows`: on NVIDIA GPUs the Pallas radix
    search from FILTER_KERNEL_MIN_ROWS rows and its XLA form below; elsewhere the sort (the
    kernel would run in Pallas' interpret mode, and XLA's CPU backend materializes the XLA
    form's comparisons)."""
    if jax.default_backend() != "gpu":
        return "sort"
    return "kernel" if rows >= FILTER_KERNEL_MIN_ROWS else "xla"


def _kept_by_thresholds(processed, t: SamplingTensors, impl: str):
    """processed [S, V] float32 -> [S, V] bool: the tokens top-k / top-p / min-p keep, from the
    per-row thresholds of pallas_kernels/filter_thresholds (impl "kernel": the Pallas search,
    "xla": its XLA form; no sorted copy of the logits: at 1,024 x 128,256 on an H200 0.49 GiB of
    temporaries against the sort's 3.9). The same sets as _filtered up to float rounding of the
    top-p sums at the cut."""
    inv_t = 1.0 / jnp.where(t.temperature > 0, t.temperature, 1.0)
    if impl == "kernel":
        cfg = next(c for rows, c in FILTER_KERNEL_CONFIGS if processed.shape[0] >= rows)
        thresh, m = filter_thresholds(processed, inv_t, t.top_k, t.top_p, **cfg)
    else:
        thresh, m = radix_thresholds(processed, inv_t, t.top_k, t.top_p)
    keep = order_keys(processed) > thresh[:, None]
    # min-p: p >= min_p * max p, with p = exp((x - max) / T) and max p = 1
    return keep & (jnp.exp((processed - m[:, None]) * inv_t[:, None]) >= t.min_p[:, None])


def _filtered(scaled, t: SamplingTensors):
    """scaled [S, V] with the tokens outside top-k / top-p / min-p set to -inf, by sorting every
    row (10.7 ms and 3.9 GiB of temporaries at 1,024 x 128,256 on an H200)."""
    s, v = scaled.shape
    sorted_desc = jnp.sort(scaled, axis=-1)[:, ::-1]  # [S, V]
    # top-k: threshold at the k-th largest value.
    k = jnp.where(t.top_k > 0, jnp.minimum(t.top_k, v), v)
    kth = jnp.take_along_axis(sorted_desc, (k - 1)[:, None], axis=-1)  # [S, 1]
    keep = scaled >= kth
    # top-p over the sorted distribution: keep the smallest prefix whose mass reaches top_p.
    probs_sorted = jax.nn.softmax(sorted_desc, axis=-1)
    cum = jnp.cumsum(probs_sorted, axis=-1)
    # Number kept = first index where cumulative mass >= top_p, plus one.
    n_keep = jnp.sum(cum - probs_sorted < t.top_p[:, None], axis=-1)  # [S]
    n_keep = jnp.where(t.top_p >= 1.0, v, jnp.maximum(n_keep, 1))
    pth = jnp.take_along_axis(sorted_desc, (n_keep - 1)[:, None], axis=-1)
    keep &= scaled >= pth
    # min-p: drop tokens whose probability is below min_p * max probability.
    probs = jax.nn.softmax(scaled, axis=-1)
    keep &= probs >= t.min_p[:, None] * probs.max(-1, keepdims=True)
    return jnp.where(keep, scaled, _NEG_INF)


@functools.partial(jax.jit, static_argnames=("penalties", "num_logprobs", "mode"))
def sample(logits, packed, counters, *, penalties: bool, num_logprobs: int, mode: str = "filtered"):
    """logits [S, V], the sampling arrays as SamplingBatch.packed() gives them -> (tokens [S]
    int32, logprob [S] f32, rank [S] int32, top_ids [S, K] int32, top_lps [S, K] f32),
    K = num_logprobs (0: empty)."""
    t = unpack_sampling(packed, counters)
    raw = logits.astype(jnp.float32)
    tokens = _choose(raw, t, mode, penalties)
    s = logits.shape[0]
    # Logprobs are those of the model's raw distribution (vLLM's default "raw_logprobs").
    lps = jax.nn.log_softmax(raw, axis=-1)
    tok_lp = jnp.take_along_axis(lps, tokens[:, None], axis=-1)[:, 0]
    rank = jnp.sum(lps > tok_lp[:, None], axis=-1).astype(jnp.int32) + 1
    if num_logprobs > 0:
        top_lps, top_ids = jax.lax.top_k(lps, num_logprobs)
    else:
        top_lps, top_ids = jnp.zeros((s, 0), jnp.float32), jnp.zeros((s, 0), jnp.int32)
    return tokens, tok_lp, rank, top_ids.astype(jnp.int32), top_lps


@functools.partial(jax.jit, static_argnames=("penalties", "mode"))
def sample_tokens(logits, packed, counters, *, penalties: bool, mode: str = "filtered"):
    """logits [S, V] -> tokens [S] int32: sample() without the logprob work (a log-softmax, a
    rank count and a top-k over the vocabulary per row), for steps where nobody asked for
    logprobs. Same tokens as sample()."""
    t = unpack_sampling(packed, counters)
    return _choose(logits, t, mode, penalties)


@functools.partial(jax.jit, static_argnames=("num_logprobs",))
def token_logprobs(logits, targets, *, num_logprobs: int):
    """Prompt logprobs: logits [P, V], targets [P] -> (lp [P], rank [P], top_ids [P, K], top_lps [P, K])."""
    lps = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    lp = jnp.take_along_axis(lps, targets[:, None], axis=-1)[:, 0]
    rank = jnp.sum(lps > lp[:, None], axis=-1).astype(jnp.int32) + 1
    if num_logprobs > 0:
        top_lps, top_ids = jax.lax.top_k(lps, num_logprobs)
    else:
        p = logits.shape[0]
        top_lps, top_ids = jnp.zeros((p, 0), jnp.float32), jnp.zeros((p, 0), jnp.int32)
    return lp, rank, top_ids.astype(jnp.int32), top_lps
