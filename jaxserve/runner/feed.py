"""Token ids fed on the device between steps: a step dispatched before its predecessor's
samples reach the host takes them from the device (async scheduling; model_runner.py)."""
import functools

import jax
import jax.numpy as jnp


@jax.jit
def feed_rows(sampled, rows):
    """A following block's first token ids [T]: token i is the previous block's last sample of
    row rows[i] (padding rows take row 0's: harmless, they are never read)."""
    return sampled.astype(jnp.int32)[rows]


@functools.partial(jax.jit, static_argnums=(1,))
def feed(sampled, num_tokens: int):
    """Sampled ids [S] -> next step's token ids [T] (decode rows are tokens 0..S-1)."""
    return jnp.zeros(num_tokens, jnp.int32).at[:sampled.shape[0]].set(sampled.astype(jnp.int32))


@jax.jit
def fill_tokens(enc, samples):
    """enc [T]: a token id, or -1 - r for "the sample of row r"; samples [S_max] -> token ids [T]."""
    return jnp.where(enc >= 0, enc, samples[jnp.maximum(-1 - enc, 0)])
