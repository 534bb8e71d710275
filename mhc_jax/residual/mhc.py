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

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.layers import param
from mhc_jax.sinkhorn import sinkhorn_knopp

Branch = Callable[[jax.Array], jax.Array]
Mappings = tuple[jax.Array, jax.Array, jax.Array]

V4_EPS = 1e-6  # DeepSeek-V4 kernels: H_pre = sigmoid + 1e-6 and the Sinkhorn eps
_HI = jax.lax.Precision.HIGHEST  # keep f32 coefficient matmuls out of TF32 / bf16 passes on accelerators


def ablate(cfg: Config, h_pre: jax.Array, h_post: jax.Array, h_res: jax.Array) -> Mappings:
    """mHC paper Table 1: a disabled mapping becomes H_pre = 1/n, H_post = 1, H_res = identity."""
    r, n = cfg.residual, h_pre.shape[-1]
    if not r.use_pre:
        h_pre = jnp.full_like(h_pre, 1.0 / n)
    if not r.use_post:
        h_post = jnp.ones_like(h_post)
    if not r.use_res:
        h_res = jnp.broadcast_to(jnp.eye(n, dtype=h_res.dtype), h_res.shape)
    return h_pre, h_post, h_res


def pre_mix(x_BTnC: jax.Array, h_pre: jax.Array) -> jax.Array:
    """The sublayer input H_pre x (..., C), mixed in float32 and returned in the stream dtype."""
    h_in_BTC = jnp.einsum("...n,...nc->...c", h_pre, x_BTnC, precision=_HI, preferred_element_type=jnp.float32)
    return h_in_BTC.astype(x_BTnC.dtype)


def res_post_mix(x_BTnC: jax.Array, y_BTC: jax.Array, h_post: jax.Array, h_res: jax.Array,
                 transposed: bool = False) -> jax.Array:
    """H_res x + H_post^T y in one contraction over the n streams plus the sublayer output:
    new_i = sum_j h_res[i, j] x_j + h_post_i y (transposed: sum_j h_res[j, i] x_j + h_post_i y).
    Float32 accumulation, result in the stream dtype."""
    mix = "...ji,...jc->...ic" if transposed else "...ij,...jc->...ic"
    res_BTnC = jnp.einsum(mix, h_res, x_BTnC, precision=_HI, preferred_element_type=jnp.float32)
    return (res_BTnC + h_post[..., :, None] * y_BTC.astype(jnp.float32)[..., None, :]).astype(x_BTnC.dtype)


def apply_mappings(x_BTnC: jax.Array, branch: Branch, h_pre: jax.Array, h_post: jax.Array,
                   h_res: jax.Array, *, transposed: bool = False) -> jax.Array:
    """x_{l+1} = H_res x + H_post^T F(H_pre x); with `transposed`, new_j = sum_i h_res[i, j] x_i.
    Mixing runs in float32 (the coefficients stay float32); the result has the stream dtype."""
    y_BTC = branch(pre_mix(x_BTnC, h_pre))
    return res_post_mix(x_BTnC, y_BTC, h_post, h_res, transposed)


def rms_projection(x_BTnC: jax.Array, phi: jax.Array, eps: float) -> jax.Array:
    """RMSNorm(vec(x)) phi in the paper's kernel form (Eq. 14-16): the matmul reads the raw streams and
    the norm's division comes after it, c = (vec(x) phi) / r with r = sqrt(mean(vec(x)^2) + eps), so the
    normalised nC-vector is never materialised. Float32 whatever the stream dtype."""
    v = x_BTnC.reshape(*x_BTnC.shape[:-2], -1)
    c = jnp.einsum("...d,dk->...k", v, phi.astype(jnp.float32), precision=_HI, preferred_element_type=jnp.float32)
    v32 = v.astype(jnp.float32)
    return c * jax.lax.rsqrt(jnp.mean(jnp.square(v32), axis=-1, keepdims=True) + eps)


# Selective recomputation (mHC paper Sec. 4.3): each piece of the connection is rematerialised from its
# inputs in the backward pass, so between forward and backward a connection keeps only its input streams,
# the per-token coefficients (n^2 + 2n floats) and the sublayer output, never the float32 intermediates.
RECOMPUTE_POLICY = jax.checkpoint_policies.nothing_saveable


def acting_h_res(h_res: jax.Array, transposed: bool) -> jax.Array:
    """The matrix A with new = A @ x (paper orientation), from a connection's native h_res."""
    return jnp.swapaxes(h_res, -1, -2) if transposed else h_res


class StreamConnection(nnx.Module):
    """What HC, mHC and mHC-lite share: per-token `mappings(x)`, then x_{l+1} = H_res x + H_post^T F(H_pre x);
    with `capture_mappings` (set by diagnostics.collect_h_res) the acting H_res is sown."""

    def __init__(self, cfg: Config, sublayer_index: int, transposed: bool = False):
        self.cfg = cfg
        self.n = cfg.n_streams
        self.sublayer_index = sublayer_index
        self.transposed = transposed
        self.capture_mappings = False

    def mappings(self, x_BTnC: jax.Array) -> Mappings:
        raise NotImplementedError

    def __call__(self, x_BTnC: jax.Array, branch: Branch) -> jax.Array:
        if not self.cfg.residual.recompute:
            h_pre, h_post, h_res = self.mappings(x_BTnC)
            self._capture(h_res)
            return apply_mappings(x_BTnC, branch, h_pre, h_post, h_res, transposed=self.transposed)
        h_pre, h_post, h_res = nnx.remat(type(self).mappings, policy=RECOMPUTE_POLICY)(self, x_BTnC)
        self._capture(h_res)
        y_BTC = branch(jax.checkpoint(pre_mix, policy=RECOMPUTE_POLICY)(x_BTnC, h_pre))
        post = jax.checkpoint(res_post_mix, policy=RECOMPUTE_POLICY, static_argnums=(4,))
        return post(x_BTnC, y_BTC, h_post, h_res, self.transposed)

    def _capture(self, h_res: jax.Array) -> None:
        if self.capture_mappings:
            self.sow(nnx.Intermediate, "h_res", acting_h_res(h_res, self.transposed))


class ManifoldHyperConnection(StreamConnection):
    """mHC around one sublayer; `conn(x_BTnC, branch) -> x_BTnC`. See the module docstring."""

    def __init__(self, cfg: Config, sublayer_index: int, *, rngs: nnx.Rngs):
        r = cfg.residual
        super().__init__(cfg, sublayer_index, transposed=r.variant == "deepseek_v4")
        n, C = self.n, cfg.model.d_model
        self.norm_eps = cfg.model.norm_eps
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
        r, n = self.cfg.residual, self.n
        logits = res_logits.reshape(*res_logits.shape[:-1], n, n)
        # Under selective recomputation the whole coefficient function is rematerialised, so Sinkhorn's
        # own input-only custom VJP would run the iterations a third time: differentiate the loop instead.
        rb = not r.recompute
        if not self.transposed:
            return sinkhorn_knopp(logits, r.sinkhorn_iters, r.sinkhorn_eps, r.sinkhorn_log_domain,
                                  recompute_backward=rb, impl=r.impl)
        # DeepSeek-V4 `comb`: row softmax + eps, then column/row steps ending on columns. sinkhorn_knopp
        # works in paper orientation (rows last), so it runs on the transpose and hands back comb.
        acting = sinkhorn_knopp(jnp.swapaxes(logits, -1, -2), r.sinkhorn_iters, r.sinkhorn_eps or V4_EPS,
                                r.sinkhorn_log_domain, softmax_start=True, recompute_backward=rb,
                                impl=r.impl)
        return jnp.swapaxes(acting, -1, -2)

    def mappings(self, x_BTnC: jax.Array) -> Mappings:
        """(h_pre (..., n), h_post (..., n), h_res (..., n, n)) in float32, ablations applied."""
        if x_BTnC.shape[-2] != self.n:
            raise ValueError(f"mHC connection expects {self.n} streams, got shape {x_BTnC.shape}")
        pre, post, res = self.projections(x_BTnC)
        b = self.bias[...].astype(jnp.float32)
        h_pre = jax.nn.sigmoid(self.alpha_pre[...] * pre + b[:self.n])
        if self.transposed:
            h_pre = h_pre + V4_EPS
        h_post = 2.0 * jax.nn.sigmoid(self.alpha_post[...] * post + b[self.n:2 * self.n])  # Eq. 8: factor 2
        h_res = self.res_mapping(self.alpha_res[...] * res + b[2 * self.n:])
        return ablate(self.cfg, h_pre, h_post, h_res)


def mhc_param_count(cfg: Config) -> int:
    """Parameters of one mHC connection: phi (nC x (n^2 + 2n)), b (n^2 + 2n), a_pre, a_post, a_res."""
    n, C = cfg.n_streams, cfg.model.d_model
    k = n * n + 2 * n
    return n * C * k + k + 3
