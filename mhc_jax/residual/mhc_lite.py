"""mHC-lite (arXiv 2601.05732): H_res as a convex combination of the n! permutation matrices.

Birkhoff-von Neumann: every doubly stochastic matrix is a convex combination of permutation matrices, so
    H_res = sum_k w_k P_k,   w = softmax(a_res * c_res + b_res) over the n! permutations
is exactly doubly stochastic with no Sinkhorn iteration (24 permutations at n = 4). H_pre and H_post, the
fused projection (now nC x (n! + 2n), slices [pre | post | res]), the gating scalars and the init are
mHC's (see mhc_jax.residual.mhc). Mixing is in paper orientation, new_i = sum_j h_res[i, j] x_j; the
DeepSeek-V4 variant applies to `mhc` only.
"""

from __future__ import annotations

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.config import ResidualConfig
from mhc_jax.residual.base import mixing_flops
from mhc_jax.residual.mhc import ManifoldHyperConnection


def permutation_matrices(n: int) -> np.ndarray:
    """(n!, n, n) with P_k[i, perm_k[i]] = 1, in itertools.permutations order (identity first)."""
    perms = list(itertools.permutations(range(n)))
    out = np.zeros((len(perms), n, n), np.float32)
    for k, perm in enumerate(perms):
        out[k, np.arange(n), perm] = 1.0
    return out


class MHCLite(ManifoldHyperConnection):
    """mHC with H_res = softmax-weighted permutation matrices; `conn(x_BTnC, branch) -> x_BTnC`."""

    def __init__(self, residual: ResidualConfig, d_model: int, sublayer_index: int, *, norm_eps: float,
                 rngs: nnx.Rngs):
        super().__init__(residual, d_model, sublayer_index, norm_eps=norm_eps, rngs=rngs)
        self.transposed = False

    @property
    def res_dim(self) -> int:
        return math.factorial(self.n)

    def res_mapping(self, res_logits: jax.Array) -> jax.Array:
        w = jax.nn.softmax(res_logits.astype(jnp.float32), axis=-1)
        return jnp.einsum("...k,kij->...ij", w, jnp.asarray(permutation_matrices(self.n)),
                          precision=jax.lax.Precision.HIGHEST)


def mhc_lite_param_count(residual: ResidualConfig, d_model: int) -> int:
    """Parameters of one mHC-lite connection: phi (nC x (n! + 2n)), b (n! + 2n), three gating scalars."""
    n, C = residual.n_streams, d_model
    k = math.factorial(n) + 2 * n
    return n * C * k + k + 3


def mhc_lite_flops(residual: ResidualConfig, d_model: int) -> float:
    """Forward FLOPs per token of one mHC-lite connection: the fused projection (n! + 2n columns), the
    convex mix of n! permutation matrices and the stream mixing."""
    n, C = residual.n_streams, d_model
    perms = math.factorial(n)
    return 2.0 * n * C * (perms + 2 * n) + 2.0 * perms * n * n + mixing_flops(n, C)
