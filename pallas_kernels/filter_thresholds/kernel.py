"""Top-k / top-p thresholds per row without sorting: a radix search in Pallas (Triton lowering on
NVIDIA GPUs, interpret mode elsewhere). Contract: reference.py.

Why: the sampler's "filtered" mode (any request with top_k / top_p / min_p) sorted every row of
logits; at 1,024 rows x 128,256 that was 10.1-10.8 ms and 3.9 GiB of temporaries on an H200, a
third of a Llama-3-8B decode step. The kept set is an upper set of the row's values, so only its
threshold is needed, not a sorted copy: the threshold's order key is found `bits` bits at a
time, from the top, by counting (top-k) and summing probabilities (top-p) over the row for each
of the 2^bits next digits. One search finds max(top-k's threshold, top-p's) directly: the
largest T where count(key > T) >= k or mass(key > T) >= top_p * total.

Work split: one program per row. Pass 0 reads the row once for its max and its probability mass
(online, as in a softmax); each of the 32 / bits radix passes reads it again in chunks of
`chunk` tokens, compares each key with the 2^bits candidates and accumulates counts and masses
elementwise in [2^bits, chunk] registers, reduced once per pass (a first version that reduced
across warps in every chunk, with two separate searches, only tied the sort). A row without
top-k skips the counts, a row with neither filter runs no pass.

Cost (H200, 1,024 rows x 128,256, scripts/bench_filter_radix.py): 2 bits (17 reads of the row,
8.9 GB: 2.8 ms at the copy ceiling) runs in 5.8 ms against the sort's 10.1 ms; 4 bits (9 reads)
is slower (7.0 ms): per pass it makes 16 comparisons, selects and adds per token per filter, and
that compute, not the bytes, bounds it. A row is one program, so a batch with fewer rows than
the GPU has SMs leaves it partly idle: at 128 rows the kernel needs wider programs (4,096-token
chunks, 16 warps: 0.96 ms against the sort's 1.34), and below that the sampler runs the same
search in XLA ops (xla.py; runner/sampler.py FILTER_KERNEL_MIN_ROWS, FILTER_KERNEL_CONFIGS).
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .reference import INT32_MIN, effective_top_k, order_keys

_SIGN = INT32_MIN  # xor with it maps signed order keys to unsigned order (as int32 bit patterns)


def _kernel(x_ref, inv_temp_ref, top_k_ref, top_p_ref, thresh_ref, max_ref, *, v: int, chunk: int, bits: int):
    # x_ref [S, V] float32; inv_temp_ref, top_p_ref [S] float32; top_k_ref [S] int32 (clamped to
    # [1, V], V: off); outputs thresh_ref [S] int32 (order keys), max_ref [S] float32.
    row = pl.program_id(0)
    n_chunks = pl.cdiv(v, chunk)
    inv_t = inv_temp_ref[row]
    k = top_k_ref[row]
    top_p = top_p_ref[row]
    lanes = jnp.arange(chunk, dtype=jnp.int32)

    def load(i):
        cols = i * chunk + lanes
        ok = cols < v
        return pltriton.load(x_ref.at[row, pl.ds(i * chunk, chunk)], mask=ok, other=-jnp.inf), ok

    def max_and_mass(i, carry):  # online max and sum of exp((x - max) * inv_t)
        m, total = carry
        x, _ = load(i)
        m_new = jnp.maximum(m, jnp.max(x))
        # While every token so far is -inf (banned or masked), there is no mass to rescale and
        # (-inf) - (-inf) would make it NaN.
        ref = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        total = jnp.where(m == -jnp.inf, 0.0, total * jnp.exp((m - ref) * inv_t))
        return m_new, total + jnp.sum(jnp.exp((x - ref) * inv_t))

    m, total = jax.lax.fori_loop(0, n_chunks, max_and_mass, (jnp.float32(-jnp.inf), jnp.float32(0)))
    k_on = k < v
    p_on = top_p < 1.0
    # One search for max(top-k's threshold, top-p's): the largest T with count(key > T) >= k
    # or mass(key > T) >= target (each predicate holds for every T up to its own threshold). An
    # off filter's predicate never holds above the row's smallest key.
    target = jnp.where(p_on, top_p * total, jnp.inf)
    n_digits = 1 << bits
    digits = jnp.arange(n_digits, dtype=jnp.int32)[:, None]  # [R, 1]

    def accumulate(i, carry, cand, do_k: bool):
        # elementwise partial sums [R, C], reduced once per pass rather than per chunk
        cnt, mass = carry
        x, ok = load(i)
        above = order_keys(x)[None, :] > cand  # [R, C]
        if do_k:
            cnt += (above & ok[None, :]).astype(jnp.int32)
        mass += jnp.where(above, jnp.exp((x - m) * inv_t)[None, :], 0.0)  # (0 where masked)
        return cnt, mass

    def radix_pass(j, prefix):
        # The prefix is in unsigned order (a bit pattern in int32); a key is above candidate c
        # when key > (c ^ _SIGN) in signed comparison.
        shift = 32 - bits * (j + 1)
        cand = (prefix + (digits << shift)) ^ _SIGN  # [R, 1] signed-order candidates
        carry = (jnp.zeros((n_digits, chunk), jnp.int32), jnp.zeros((n_digits, chunk), jnp.float32))
        # A row with top-k runs the loop that counts and sums, one with top-p only the loop that
        # sums (the common request, a third less work), one with neither no loop: trip counts
        # are per row, the loop not taken runs zero times. (lax.select: jnp.where of two Python
        # ints lowered the bound to i1 in Triton.)
        for do_k, trips in ((True, k_on), (False, p_on & ~k_on)):
            trip_count = jax.lax.select(trips, jnp.int32(n_chunks), jnp.int32(0))
            carry = jax.lax.fori_loop(jnp.int32(0), trip_count,
                                      functools.partial(accumulate, cand=cand, do_k=do_k), carry)
        cnt, mass = jnp.sum(carry[0], axis=1), jnp.sum(carry[1], axis=1)  # [R]
        holds = (k_on & (cnt >= k)) | (mass >= target)  # true for the digits up to the answer's
        return prefix + (jnp.maximum(jnp.sum(holds.astype(jnp.int32)) - 1, 0) << shift)

    # (a loop, not unrolled: 32 / bits copies of the passes made the Triton compile the slow part
    # of the engine's warm-up)
    prefix = jax.lax.fori_loop(0, 32 // bits, radix_pass, jnp.int32(0))
    found = jnp.where(k_on | p_on, prefix ^ _SIGN, INT32_MIN)
    thresh_ref[row] = jnp.minimum(found, order_keys(m) - 1)
    max_ref[row] = m


@functools.partial(jax.jit, static_argnames=("chunk", "bits", "num_warps", "interpret"))
def filter_thresholds(x, inv_temp, top_k, top_p, *, chunk: int = 1024, bits: int = 2, num_warps: int = 4,
                      interpret: Optional[bool] = None):
    """x [S, V] float32 logits, inv_temp [S] float32 (> 0), top_k [S] int32 (<= 0 or >= V: off),
    top_p [S] float32 (>= 1: off) -> (threshold [S] int32 order keys: keep key > threshold, row
    max [S] float32); see reference.py."""
    s, v = x.shape
    if 32 % bits or chunk & (chunk - 1):
        raise ValueError(f"bits must divide 32 and chunk be a power of two, got bits={bits} chunk={chunk}")
    if interpret is None:
        interpret = jax.devices()[0].platform != "gpu"
    k = effective_top_k(top_k, v)
    full = lambda shape: pl.BlockSpec(shape, lambda i: (0,) * len(shape))  # noqa: E731
    kwargs = {} if interpret else {"compiler_params": pltriton.CompilerParams(num_warps=num_warps, num_stages=2)}
    return pl.pallas_call(
        functools.partial(_kernel, v=v, chunk=chunk, bits=bits),
        grid=(s,),
        in_specs=[full((s, v)), full((s,)), full((s,)), full((s,))],
        out_specs=[full((s,)), full((s,))],
        out_shape=[jax.ShapeDtypeStruct((s,), jnp.int32), jax.ShapeDtypeStruct((s,), jnp.float32)],
        interpret=interpret,
        name="filter_thresholds",
        **kwargs,
    )(x.astype(jnp.float32), inv_temp.astype(jnp.float32), k, top_p.astype(jnp.float32))
