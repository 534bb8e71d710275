"""mHC: Manifold-Constrained Hyper-Connections (mHC paper Eq. 7-9), and the pieces HC and mHC-lite share.

One connection wraps one sublayer F over n residual streams x_l of shape (n, C), per token:

    x_{l+1} = H_res x_l + H_post^T F(H_pre x_l)

Mixing orientation. `mappings` returns (h_pre (..., n), h_post (..., n), h_res (..., n, n)). With
variant="paper" the streams mix as   new_i = sum_j h_res[i, j] x_j   (rows of h_res sum to 1).
With variant="deepseek_v4" h_res is DeepSeek-V4's `comb` and is applied transposed:
new_j = sum_i h_res[i, j] x_i (its columns sum to 1). The matrix that acts as new = A @ x (the one the
Amax gains are defined on) is `acting_h_res(h_res)`; that is what `collect_h_res` captures.

Coefficients (paper Eq. 7-8, kernel form Eq. 14-16), all in float32 whatever the stream dtype:
v = vec(x) in R^{nC}; one fused projection phi in R^{nC x (n^2 + 2n)} whose output columns are, in this
order, [pre (n) | post (n) | res (n^2, row-major mat(.))]; c = RMSNorm(v) phi (the norm's weight is
folded into phi);
    H_pre  = sigmoid(a_pre * c_pre + b_pre)            (V4: + 1e-6)
    H_post = 2 * sigmoid(a_post * c_post + b_post)
    H_res  = SinkhornKnopp(a_res * mat(c_res) + b_res)  (V4: softmax start, eps, transposed use)
with a_pre = a_post = a_res = residual.alpha_init (0.01, paper Table 5), b = 0 and a fan-in normal phi
(MaxText; the paper states no init for b and phi). At init H_pre = 1/2, H_post = 1 and H_res ~ 1/n.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from mhc_jax.config import ResidualConfig
from mhc_jax.layers import param
# Re-exported: the shared pieces used to live here.
from mhc_jax.residual.base import (_HI, RECOMPUTE_POLICY, Branch, Mappings, StreamConnection,  # noqa: F401
                                  ablate, acting_h_res, apply_mappings, mixing_flops, pre_mix, res_post_mix)
from mhc_jax.residual.mhc_pallas import mhc_coefficients
from mhc_jax.sinkhorn import sinkhorn_flops, sinkhorn_knopp

V4_EPS = 1e-6  # DeepSeek-V4 kernels: H_pre = sigmoid + 1e-6 and the Sinkhorn eps


def rms_projection(x_BTnC: jax.Array, phi: jax.Array, eps: float) -> jax.Array:
    """RMSNorm(vec(x)) phi in the paper's kernel form (Eq. 14-16): the matmul reads the raw streams and
    the norm's division comes after it, c = (vec(x) phi) / r with r = sqrt(mean(vec(x)^2) + eps), so the
    normalised nC-vector is never materialised. Float32 whatever the stream dtype."""
    v = x_BTnC.reshape(*x_BTnC.shape[:-2], -1)
    c = jnp.einsum("...d,dk->...k", v, phi.astype(jnp.float32), precision=_HI, preferred_element_type=jnp.float32)
    v32 = v.astype(jnp.float32)
    # Named for selective recomputation (base.COEFFICIENT_POLICY): the n^2 + 2n + 1 floats per token are kept,
    # so the backward recomputes only the gates and Sinkhorn, not the pass over the n C stream values.
    mean_square = checkpoint_name(jnp.mean(v32 * v32, axis=-1, keepdims=True) + eps, "mhc_mean_square")
    return checkpoint_name(c, "mhc_projection") * jax.lax.rsqrt(mean_square)


class ManifoldHyperConnection(StreamConnection):
    """mHC around one sublayer; `conn(x_BTnC, branch) -> x_BTnC`. See the module docstring."""

    def __init__(self, residual: ResidualConfig, d_model: int, sublayer_index: int, *, norm_eps: float,
                 rngs: nnx.Rngs):
        r = residual
        super().__init__(r, sublayer_index, transposed=r.variant == "deepseek_v4")
        n, C = self.n, d_model
        self.norm_eps = norm_eps
        k = self.res_dim + 2 * n
        self.phi = param(rngs, nnx.initializers.lecun_normal(), (n * C, k), ("embed", "mhc"))
        self.bias = param(rngs, nnx.initializers.zeros, (k,), ("mhc",))
        alpha = nnx.initializers.constant(r.alpha_init)
        self.alpha_pre = param(rngs, alpha, (), ())
        self.alpha_post = param(rngs, alpha, (), ())
        self.alpha_res = param(rngs, alpha, (), ())

    @property
    def res_dim(self) -> int:
        """Width of the res slice of the fused projection: n^2 logits of mat(H~_res)."""
        return self.n * self.n

    def projections(self, x_BTnC: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """The fused projection RMSNorm(vec(x)) phi split in the documented order [pre | post | res]."""
        n = self.n
        c = rms_projection(x_BTnC, self.phi[...], self.norm_eps)  # RMSNorm over all nC values, Eq. 14-16
        return c[..., :n], c[..., n:2 * n], c[..., 2 * n:]

    def res_mapping(self, res_logits: jax.Array) -> jax.Array:
        """(..., n^2) gated logits -> native h_res (..., n, n) by Sinkhorn-Knopp (paper Eq. 9)."""
        r, n = self.residual, self.n
        logits = res_logits.reshape(*res_logits.shape[:-1], n, n)
        # Under selective recomputation the whole coefficient function is rematerialised, so Sinkhorn's
        # own input-only custom VJP would run the iterations a third time: differentiate the loop instead.
        # (With residual.impl=pallas, `mappings` runs Sinkhorn inside the coefficient kernel instead.)
        sinkhorn = functools.partial(sinkhorn_knopp, recompute_backward=not r.recompute)
        if not self.transposed:
            return sinkhorn(logits, r.sinkhorn_iters, r.sinkhorn_eps, r.sinkhorn_log_domain)
        # DeepSeek-V4 `comb`: row softmax + eps, then column/row steps ending on columns. sinkhorn_knopp
        # works in paper orientation (rows last), so it runs on the transpose and hands back comb.
        acting = sinkhorn(jnp.swapaxes(logits, -1, -2), r.sinkhorn_iters, r.sinkhorn_eps or V4_EPS,
                          r.sinkhorn_log_domain, softmax_start=True)
        return jnp.swapaxes(acting, -1, -2)

    def mappings(self, x_BTnC: jax.Array) -> Mappings:
        """(h_pre (..., n), h_post (..., n), h_res (..., n, n)) in float32, ablations applied."""
        if x_BTnC.shape[-2] != self.n:
            raise ValueError(f"mHC connection expects {self.n} streams, got shape {x_BTnC.shape}")
        r = self.residual
        if r.impl == "pallas" and r.kind == "mhc":  # projection, gates, Sinkhorn in one kernel (mhc_pallas)
            eps = (r.sinkhorn_eps or V4_EPS) if self.transposed else r.sinkhorn_eps
            return ablate(r, *mhc_coefficients(x_BTnC, self.phi[...], self.bias[...], self.alpha_pre[...],
                                               self.alpha_post[...], self.alpha_res[...], norm_eps=self.norm_eps,
                                               iters=r.sinkhorn_iters, eps=eps, v4=self.transposed))
        pre, post, res = self.projections(x_BTnC)
        b = self.bias[...].astype(jnp.float32)
        h_pre = jax.nn.sigmoid(self.alpha_pre[...] * pre + b[:self.n])
        if self.transposed:
            h_pre = h_pre + V4_EPS
        h_post = 2.0 * jax.nn.sigmoid(self.alpha_post[...] * post + b[self.n:2 * self.n])  # Eq. 8: factor 2
        h_res = self.res_mapping(self.alpha_res[...] * res + b[2 * self.n:])
        return ablate(self.residual, h_pre, h_post, h_res)


def mhc_param_count(residual: ResidualConfig, d_model: int) -> int:
    """Parameters of one mHC connection: phi (nC x (n^2 + 2n)), b (n^2 + 2n), a_pre, a_post, a_res."""
    n, C = residual.n_streams, d_model
    k = n * n + 2 * n
    return n * C * k + k + 3


def mhc_flops(residual: ResidualConfig, d_model: int) -> float:
    """Forward FLOPs per token of one mHC connection: the fused coefficient projection (paper Eq. 14),
    Sinkhorn-Knopp on the n x n logits (Eq. 9) and the stream mixing."""
    n, C = residual.n_streams, d_model
    return 2.0 * n * C * (n * n + 2 * n) + sinkhorn_flops(n, residual.sinkhorn_iters) + mixing_flops(n, C)
