"""Leaf layers and helpers shared by every model piece (the Flax gemma example's layers.py): parameters with
logical axis names, the compute dtype, RMSNorm (float32 whatever the activation dtype), rotary position
embeddings (half-split layout, angles in float32) and the SwiGLU activation. Imports nothing from the package."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Initializer = Callable[[jax.Array, tuple[int, ...], jnp.dtype], jax.Array]


def param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Sequence[str | None],
          dtype: jnp.dtype = jnp.float32) -> nnx.Param:
    """An nnx.Param whose `axes` metadata names one logical axis per dimension."""
    if len(axes) != len(shape):
        raise ValueError(f"param of shape {tuple(shape)} needs {len(shape)} axis names, got {tuple(axes)}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), axes=tuple(axes))


def compute_dtype(name: str) -> jnp.dtype:
    """'auto' is bfloat16 on accelerators and float32 on CPU (bf16 matmuls are slow on CPU)."""
    if name == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(name)


def rms_norm(x: jax.Array, eps: float, axis: int | tuple[int, ...] = -1) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) over `axis`, in float32, returned in float32."""
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=axis, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale initialised to 1; output in `dtype`."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, rngs: nnx.Rngs):
        self.scale = param(rngs, nnx.initializers.ones, (dim,), ("norm",))
        self.eps = eps
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        return (rms_norm(x, self.eps) * self.scale[...]).astype(self.dtype)


def apply_rope(x_BTHD: jax.Array, positions_BT: jax.Array, theta: float) -> jax.Array:
    """Rotates pairs (x[..., i], x[..., i + D/2]) by positions * theta^(-2i/D).

    Written as x cos + rotate_half(x) sin with full-width (B, T, D) tables, the same products and sums as
    rotating the two halves: the cos / sin tables sit behind a barrier so XLA computes them once per
    call instead of fusing the transcendental functions into every head's rotation (2 CPU cores, forward
    and backward of an attention layer at nanoGPT's shape: RoPE's share fell from ~1.3 to ~1.0 ms)."""
    d = x_BTHD.shape[-1]
    inv_freq_J = theta ** (-jnp.arange(0, d // 2, dtype=jnp.float32) * 2.0 / d)
    angles_BTJ = positions_BT.astype(jnp.float32)[..., None] * inv_freq_J
    cos_BTJ, sin_BTJ = jnp.cos(angles_BTJ), jnp.sin(angles_BTJ)
    cos_BTD, sin_BTD = jax.lax.optimization_barrier((jnp.concatenate([cos_BTJ, cos_BTJ], axis=-1),
                                                     jnp.concatenate([-sin_BTJ, sin_BTJ], axis=-1)))
    x = x_BTHD.astype(jnp.float32)
    x1, x2 = jnp.split(x, 2, axis=-1)
    out = x * cos_BTD[:, :, None, :] + jnp.concatenate([x2, x1], axis=-1) * sin_BTD[:, :, None, :]
    return out.astype(x_BTHD.dtype)


@jax.custom_vjp
def swiglu(gate_up_BTuF: jax.Array) -> jax.Array:
    """silu(gate) * up of the stacked pair (gate, up) on axis -2 (u = 2)."""
    return jax.nn.silu(gate_up_BTuF[..., 0, :]) * gate_up_BTuF[..., 1, :]


def _swiglu_fwd(gate_up_BTuF: jax.Array) -> tuple[jax.Array, jax.Array]:
    return swiglu(gate_up_BTuF), gate_up_BTuF


def _swiglu_bwd(gate_up_BTuF: jax.Array, dh_BTF: jax.Array) -> tuple[jax.Array]:
    # Both halves of the gradient written as one stacked array: autodiff of the two slices would build two
    # zero-padded gradients and add them. silu'(g) = s (1 + g (1 - s)) with s = sigmoid(g).
    g_BTF, up_BTF = gate_up_BTuF[..., 0, :], gate_up_BTuF[..., 1, :]
    s_BTF = jax.nn.sigmoid(g_BTF)
    return (jnp.stack([dh_BTF * up_BTF * s_BTF * (1 + g_BTF * (1 - s_BTF)), dh_BTF * g_BTF * s_BTF], axis=-2),)


swiglu.defvjp(_swiglu_fwd, _swiglu_bwd)
