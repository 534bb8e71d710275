"""Activation memory of one decoder block, by compiled memory analysis (no device run)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.model.transformer import Block


def block_activation_bytes_per_token(cfg: Config) -> float:
    """Bytes one block keeps from its forward pass for its backward pass, per token: the outputs of the
    jitted jax.vjp closure of the block (compiled memory analysis) at batch 2 minus batch 1, so the
    parameters (also held by the closure) cancel. Streams in float32, sequence data.seq_len."""
    seq, d = cfg.data.seq_len, cfg.model.d_model
    graphdef, params = nnx.split(Block(cfg, 0, rngs=nnx.Rngs(0)))
    sizes = []
    for batch in (1, 2):
        pos = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        seg = jnp.ones((batch, seq), jnp.int32)
        f = lambda p, x: nnx.merge(graphdef, p)(x, pos, seg, None, None)[0]
        x = jax.ShapeDtypeStruct((batch, seq, cfg.n_streams, d), jnp.float32)
        compiled = jax.jit(lambda p, x_: jax.vjp(f, p, x_)[1]).lower(params, x).compile()
        sizes.append(compiled.memory_analysis().output_size_in_bytes)
    return float(sizes[1] - sizes[0]) / seq
