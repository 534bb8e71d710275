"""mHC as Pallas kernels (`residual.impl: pallas`): the per-token coefficients in one kernel, and the
stream mixing (H_pre x; H_res x + H_post^T y) in two more, each with an exact custom VJP.

Coefficients (`mhc_coefficients`, mHC paper Eq. 7-9 in the kernel form of Eq. 14-16): one kernel instance
reads a block of tokens' n-stream state once, as (tokens, nC) rows, and in on-chip memory computes
vec(x) phi (float32 accumulation) and the sum of squares in the same pass over the row, divides by the
RMS after the matmul, applies a * . + b, the sigmoid gates of H_pre and H_post and all Sinkhorn iterations
of H_res (`mhc_jax.sinkhorn_pallas.sinkhorn_vectors`), and writes the n^2 + 2n coefficients per token.
phi enters the matmul as three bfloat16 parts (hi + mid + lo = float32 phi exactly, `bf16_parts`), and
float32 streams are split the same way in the kernel, so bfloat16 matrix units give float32 accuracy.
The backward stores the inputs and the normalised projection; a second kernel (`gates_bwd_call`)
recomputes the gates and the Sinkhorn iterates on-chip and back-propagates through every iteration
(`sinkhorn_vectors_vjp`: the exact gradient of the truncated loop, as the paper's kernels do), and the
projection's backward is two matmuls by formula (on bfloat16 streams as bfloat16 parts: matrix units,
float32 accuracy for dphi).

Mixing (`pre_mix_pallas`, `res_post_mix_pallas`): one kernel instance reads a block of tokens' streams
once, channel chunk by chunk, and writes H_pre x (resp. every new stream H_res x + H_post^T y) with
float32 accumulation in the stream dtype. Both are linear: their backward is one more kernel each
(dx = H^T g and dy = H_post . g elementwise, the coefficient gradients as per-token sums over channels),
exact up to float32 rounding.

Layout: streams as (N, nC) rows (tokens N = B*T; free reshapes of (B, T, n, C)), blocks of whole rows, so
the n streams of a token are n static slices of one block; coefficients as (N, K) float32 with K the next
power of two >= n^2 + 2n, columns [pre (n) | post (n) | res (n^2, row-major)]. Every value in a kernel has
power-of-two dimensions (Triton's rule) and lane-aligned slices (Mosaic's).

Platforms, chosen per lowering platform by `jax.lax.platform_dependent`: Triton on GPU, Mosaic on TPU
(compiled ahead of time for a v4 megacore topology in the tests; there the coefficient tile is transposed
so tokens lie on the 128 lanes during Sinkhorn), interpret mode on CPU (tests; not for speed).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.sharding import PartitionSpec

from mhc_jax.sharding import logical_to_spec
from mhc_jax.sinkhorn_pallas import sinkhorn_vectors, sinkhorn_vectors_vjp

V4_EPS = 1e-6  # DeepSeek-V4: H_pre = sigmoid + 1e-6 (mhc_jax.residual.mhc)


def _pow2_at_least(k: int) -> int:
    return 1 << max(k - 1, 0).bit_length()


def _pow2_part(k: int) -> int:
    """The largest power of two dividing k."""
    return k & -k


def coefficient_width(n: int) -> int:
    """K: columns of the packed coefficients, n^2 + 2n rounded up to a power of two (32 for n = 4)."""
    return _pow2_at_least(n * n + 2 * n)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Per-platform block sizes. tokens: rows per kernel instance; chunk: columns per step of the inner
    loop over a row; loop: a fori_loop over the chunks (lets Triton pipeline the loads) instead of a static
    unroll; lanes: the coefficient tile is transposed so tokens lie on lanes (TPU); warps: Triton warps."""
    coef_tokens: int
    coef_chunk: int
    mix_tokens: int
    mix_chunk: int
    loop: bool = False
    lanes: bool = False
    warps: int = 4


TILINGS = {
    "cpu": Tiling(coef_tokens=64, coef_chunk=1024, mix_tokens=64, mix_chunk=1024),
    "tpu": Tiling(coef_tokens=128, coef_chunk=512, mix_tokens=16, mix_chunk=512, lanes=True),
    "gpu": Tiling(coef_tokens=64, coef_chunk=64, mix_tokens=8, mix_chunk=256, loop=True, warps=4),
}


def _chunk(width: int, cap: int) -> int:
    """A power-of-two chunk dividing `width`, at most `cap`."""
    return min(_pow2_part(width), cap)


def _column(tile: jax.Array, k: int, width: int, axis: int, below: int | None = None) -> jax.Array:
    """Entry k of every token of a coefficient tile, summed over the lanes (or sublanes) congruent to k
    mod `width` (below `below` if given): a select and a reduction, portable where slicing one lane of a
    value is not."""
    idx = jax.lax.broadcasted_iota(jnp.int32, tile.shape, axis)
    hit = idx % width == k
    if below is not None:
        hit = hit & (idx < below)
    return jnp.sum(jnp.where(hit, tile, 0.0), axis=axis, keepdims=True)


def _assemble(cols: list[jax.Array], shape: tuple[int, int], axis: int) -> jax.Array:
    idx = jax.lax.broadcasted_iota(jnp.int32, shape, axis)
    out = jnp.zeros(shape, jnp.float32)
    for k, c in enumerate(cols):
        out = jnp.where(idx == k, c, out)
    return out


def _row_chunks(start: int, size: int, chunk: int, loop: bool, body, init):
    """fold body(carry, lo) over the column chunks [start + i * chunk, +chunk) of a block row."""
    steps = size // chunk
    if loop and steps > 1:
        return jax.lax.fori_loop(0, steps, lambda i, c: body(c, start + pl.multiple_of(i * chunk, chunk)), init)
    for i in range(steps):
        init = body(init, start + i * chunk)
    return init


# ------------------------------------------------------------------------------------------ coefficients

@dataclasses.dataclass(frozen=True)
class CoefSpec:
    """Static arguments of the coefficient computation."""
    n: int
    norm_eps: float
    iters: int
    eps: float  # Sinkhorn eps actually used (V4: sinkhorn_eps or 1e-6)
    v4: bool  # DeepSeek-V4: H_pre + 1e-6, softmax start, comb = transposed Sinkhorn


def _coef_kernel(x_ref, phi_ref, sb_ref, o_ref, *, spec: CoefSpec, kw: int, chunk: int, loop: bool,
                 lanes: bool, f32: bool):
    n = spec.n
    bt, nC = x_ref.shape
    width = phi_ref.shape[1]

    def body(carry, lo):
        acc, ss = carry
        xc = x_ref[:, pl.ds(lo, chunk)]
        pc = phi_ref[pl.ds(lo, chunk), :]
        x32 = xc.astype(jnp.float32)
        if f32:  # x = hi + mid + lo in bfloat16 too: with phi's three parts every product that float32 keeps
            parts = bf16_parts(x32)
        else:
            parts = (xc,)
        for part in parts:
            acc = acc + jnp.dot(part, pc, preferred_element_type=jnp.float32)
        return acc, ss + x32 * x32

    acc, ss = _row_chunks(0, nC, chunk, loop, body,
                          (jnp.zeros((bt, width), jnp.float32), jnp.zeros((bt, chunk), jnp.float32)))
    inv_r = jax.lax.rsqrt(jnp.sum(ss, axis=1, keepdims=True) / nC + spec.norm_eps)  # Eq. 15: divide after
    used = 3 * kw  # the three phi parts; lane `used` carries 1 / r for the backward
    lane = jax.lax.broadcasted_iota(jnp.int32, acc.shape, 1)
    c = jnp.where(lane < used, acc * inv_r, jnp.where(lane == used, inv_r, 0.0))
    z = c * sb_ref[0:1, :] + sb_ref[1:2, :]  # a * (v phi) / r + b, every phi part scaled alike
    axis = 1
    if lanes:  # TPU: tokens onto the 128 lanes, so each coefficient below is one lane-dense row
        z, c, axis = z.T, c.T, 0
    k = n * n + 2 * n
    cols = [_column(z, j, kw, axis) for j in range(k)]
    saved = [_column(c, j, kw, axis, below=used) for j in range(k)] + [_column(c, used, width, axis)]
    pre = [jax.nn.sigmoid(c) + (V4_EPS if spec.v4 else 0.0) for c in cols[:n]]
    post = [2.0 * jax.nn.sigmoid(c) for c in cols[n:2 * n]]  # Eq. 8: factor 2
    res = cols[2 * n:]
    if spec.v4:  # comb: Sinkhorn of the transpose with the softmax start, handed back transposed
        t = sinkhorn_vectors([res[j * n + i] for i in range(n) for j in range(n)], n, spec.iters, spec.eps, True)
        res = [t[j * n + i] for i in range(n) for j in range(n)]
    else:
        res = sinkhorn_vectors(res, n, spec.iters, spec.eps, False)
    o_ref[...] = _assemble(pre + post + res + saved, o_ref.shape, axis)


def _truncate_to_bf16(v: jax.Array) -> jax.Array:
    """v (float32) with its low 16 bits cleared: exactly a bfloat16 value, still float32. Bit operations,
    not a convert round trip: XLA on GPU drops float32 -> bfloat16 -> float32 pairs (excess precision),
    which silently made the lower parts zero (seen on an H100: phi rounded to bfloat16, errors ~6e-4)."""
    bits = jax.lax.bitcast_convert_type(v, jnp.int32) & jnp.int32(-65536)  # 0xFFFF0000
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def bf16_parts(v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """float32 v = hi + mid + lo exactly, each part a bfloat16 array (8 + 8 + 8 significant bits)."""
    hi = _truncate_to_bf16(v)
    r = v - hi  # exact: the low 16 bits of v
    mid = _truncate_to_bf16(r)
    return hi.astype(jnp.bfloat16), mid.astype(jnp.bfloat16), (r - mid).astype(jnp.bfloat16)


def _phi_parts(phi: jax.Array) -> tuple[jax.Array, int]:
    """phi (nC, k) -> (nC, width) for the kernel's matmul: three bfloat16 parts hi + mid + lo = phi
    (exactly) side by side, each padded to the coefficient width kw, so bfloat16 matmuls (the only
    ones Triton compiled in reasonable time on an H100; float32 ones did not finish in minutes) give the
    float32 projection. Returns (parts, kw)."""
    nC, k = phi.shape
    kw = _pow2_at_least(k)
    phi = jnp.pad(phi.astype(jnp.float32), ((0, 0), (0, kw - k)))
    cat = jnp.concatenate(bf16_parts(phi), axis=1)
    width = max(128, _pow2_at_least(cat.shape[1]))  # lane-dense tiles
    return jnp.pad(cat, ((0, 0), (0, width - cat.shape[1]))), kw


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    pad = -a.shape[0] % multiple
    return jnp.pad(a, ((0, pad), (0, 0))) if pad else a


def _platform_call(fn, *args, replicated: int = 0):
    """fn(tiling, interpret, platform, *args) for the platform the computation is lowered for. The args
    are (N, .) per-token rows except the last `replicated` ones; every result is per-token rows. Under a
    mesh whose batch axes (mhc_jax.sharding, "activation_batch") split the tokens, the kernels run per
    shard in a shard_map (a Mosaic or Triton call cannot be partitioned automatically; tokens are
    independent, so each device's kernels see only its own rows)."""
    def call(*a):
        return jax.lax.platform_dependent(
            *a,
            cpu=lambda *b: fn(TILINGS["cpu"], True, "cpu", *b),
            tpu=lambda *b: fn(TILINGS["tpu"], False, "tpu", *b),
            default=lambda *b: fn(TILINGS["gpu"], False, "gpu", *b))

    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return call(*args)
    rows = logical_to_spec(("activation_batch",), None, mesh)
    ways = 1
    for axis in jax.tree.leaves(tuple(rows)):
        ways *= mesh.shape[axis]
    if ways == 1 or args[0].shape[0] % ways:
        return call(*args)
    specs = (rows,) * (len(args) - replicated) + (PartitionSpec(),) * replicated
    return jax.shard_map(call, mesh=mesh, in_specs=specs, out_specs=rows, check_vma=False)(*args)


def _compiler_params(platform: str, tiling: Tiling, dims: int = 1, stages: int = 2) -> dict:
    if platform == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return {"compiler_params": pltpu.CompilerParams(dimension_semantics=("parallel",) * dims,
                                                        vmem_limit_bytes=64 * 2**20)}
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton
        return {"compiler_params": pltriton.CompilerParams(num_warps=tiling.warps, num_stages=stages)}
    return {}


def _coef_block(tiling: Tiling, tokens: int) -> int:
    """Tokens per instance of the coefficient kernels: the tiling's, or fewer (a power of two) for a short
    input; always the tiling's with tokens on lanes (TPU: whole 128-lane vectors)."""
    return tiling.coef_tokens if tiling.lanes else min(tiling.coef_tokens, _pow2_at_least(tokens))


def coefficients_call(tiling: Tiling, interpret: bool, platform: str, x_rows: jax.Array, phi: jax.Array,
                      scale: jax.Array, bias: jax.Array, *, spec: CoefSpec) -> jax.Array:
    """The coefficient kernel on (N, nC) rows: float32 (N, 2k + 1 padded) [pre | post | res | c | 1/r]
    with k = n^2 + 2n and c = vec(x) phi / r the normalised projection (saved for the backward)."""
    N, nC = x_rows.shape
    f32 = x_rows.dtype == jnp.float32
    parts, kw = _phi_parts(phi)
    width = parts.shape[1]
    k = spec.n * spec.n + 2 * spec.n
    a_row = jnp.pad(jnp.tile(jnp.pad(scale, (0, kw - k)), 3), (0, width - 3 * kw))  # over the 3 parts
    # (b on the first part only)
    b_row = jnp.pad(bias, (0, width - k))
    sb = jnp.zeros((8, width), jnp.float32).at[0].set(a_row).at[1].set(b_row)
    bt = _coef_block(tiling, N)
    x_p = _pad_rows(x_rows, bt)  # padded tokens: zero rows, finite coefficients, dropped below
    Np = x_p.shape[0]
    chunk = _chunk(nC, tiling.coef_chunk)
    kernel = functools.partial(_coef_kernel, spec=spec, kw=kw, chunk=chunk, loop=tiling.loop,
                               lanes=tiling.lanes, f32=f32)
    ko = _pow2_at_least(2 * k + 1)  # [h (k) | c (k) | 1 / r]
    if tiling.lanes:
        out_shape, out_spec = (ko, Np), pl.BlockSpec((ko, bt), lambda t: (0, t))
    else:
        out_shape, out_spec = (Np, ko), pl.BlockSpec((bt, ko), lambda t: (t, 0))
    out = pl.pallas_call(
        kernel, out_shape=jax.ShapeDtypeStruct(out_shape, jnp.float32), grid=(Np // bt,),
        in_specs=[pl.BlockSpec((bt, nC), lambda t: (t, 0)), pl.BlockSpec((nC, width), lambda t: (0, 0)),
                  pl.BlockSpec((8, width), lambda t: (0, 0))],
        out_specs=out_spec, interpret=interpret,
        # One Triton stage: software-pipelining the chunk loop (num_stages=2) gave wrong coefficients on an
        # H100 (jax 0.11.2) at d = 1024 (25 of 16384 tokens, errors up to 0.1) and with 128-column chunks
        # (a third of the tokens); one stage, an unrolled loop or 16-token blocks all matched XLA to 7e-6.
        **_compiler_params(platform, tiling, stages=1))(x_p, parts, sb)
    if tiling.lanes:
        out = out.T
    return out[:N]


def _scale_bias(n: int, bias: jax.Array, a_pre, a_post, a_res) -> tuple[jax.Array, jax.Array]:
    ones = jnp.ones((n,), jnp.float32)
    scale = jnp.concatenate([a_pre * ones, a_post * ones, a_res * jnp.ones((n * n,), jnp.float32)])
    return scale.astype(jnp.float32), bias.astype(jnp.float32)


def _coefficients_kernel(x_BTnC, phi, bias, a_pre, a_post, a_res, spec: CoefSpec):
    *lead, n, C = x_BTnC.shape
    k = n * n + 2 * n
    scale, b = _scale_bias(n, bias, a_pre, a_post, a_res)
    h = _platform_call(functools.partial(coefficients_call, spec=spec), x_BTnC.reshape(-1, n * C),
                       phi.astype(jnp.float32), scale, b, replicated=3)
    mappings = (h[:, :n].reshape(*lead, n), h[:, n:2 * n].reshape(*lead, n),
                h[:, 2 * n:k].reshape(*lead, n, n))
    return mappings, (h[:, k:2 * k], h[:, 2 * k:2 * k + 1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _coefficients(x_BTnC, phi, bias, a_pre, a_post, a_res, spec: CoefSpec):
    return _coefficients_kernel(x_BTnC, phi, bias, a_pre, a_post, a_res, spec)[0]


def _coefficients_fwd(x_BTnC, phi, bias, a_pre, a_post, a_res, spec):
    # Residuals: the inputs and, from the kernel, the normalised projection c and 1/r (2k + 1 floats per
    # token, the size of the coefficients themselves); no Sinkhorn iterate and no float32 copy of x.
    mappings, (c, inv_r) = _coefficients_kernel(x_BTnC, phi, bias, a_pre, a_post, a_res, spec)
    return mappings, (x_BTnC, phi, bias, a_pre, a_post, a_res, c, inv_r)


def _gates_bwd_kernel(zg_ref, o_ref, *, spec: CoefSpec):
    """dz, the cotangent of the pre-activations z = a * c + b, for a block of tokens from z (rows [0, k))
    and the coefficients' cotangent g (rows [K, K + k)), tokens along the rows: the sigmoid gates'
    derivatives and Sinkhorn's backward (`sinkhorn_vectors_vjp`) on (1, tokens) row vectors, on-chip."""
    n = spec.n
    k, K = n * n + 2 * n, coefficient_width(spec.n)
    zs = [zg_ref[j:j + 1, :] for j in range(k)]
    gs = [zg_ref[K + j:K + j + 1, :] for j in range(k)]
    dz = []
    for j in range(2 * n):  # h_pre = sigmoid(z) (+ 1e-6), h_post = 2 sigmoid(z) (Eq. 8)
        sig = jax.nn.sigmoid(zs[j])
        dz.append((1.0 if j < n else 2.0) * gs[j] * sig * (1.0 - sig))
    res, g_res = zs[2 * n:], gs[2 * n:]
    if spec.v4:  # comb = Sinkhorn of the transpose (softmax start), handed back transposed
        perm = [j * n + i for i in range(n) for j in range(n)]
        t = sinkhorn_vectors_vjp([res[p] for p in perm], [g_res[p] for p in perm], n, spec.iters, spec.eps, True)
        d_res = [t[perm.index(q)] for q in range(n * n)]
    else:
        d_res = sinkhorn_vectors_vjp(res, g_res, n, spec.iters, spec.eps, False)
    for j, row in enumerate(dz + d_res):
        o_ref[j:j + 1, :] = row
    if K > k:
        o_ref[k:K, :] = jnp.zeros((K - k, o_ref.shape[1]), jnp.float32)


def gates_bwd_call(tiling: Tiling, interpret: bool, platform: str, zg: jax.Array, *, spec: CoefSpec) -> jax.Array:
    """The gates + Sinkhorn backward kernel on (N, 2K) float32 rows [z | g] (each K = coefficient_width
    columns, zero-padded): float32 (N, K) dz. The kernel sees them transposed, tokens along its rows, so
    every per-token value is a lane-dense row vector on every platform."""
    K = coefficient_width(spec.n)
    N = zg.shape[0]
    bt = _coef_block(tiling, N)
    zg_p = _pad_rows(zg, bt).T  # padded tokens: z = g = 0, dropped below
    Np = zg_p.shape[1]
    out = pl.pallas_call(
        functools.partial(_gates_bwd_kernel, spec=spec),
        out_shape=jax.ShapeDtypeStruct((K, Np), jnp.float32), grid=(Np // bt,),
        in_specs=[pl.BlockSpec((2 * K, bt), lambda t: (0, t))], out_specs=pl.BlockSpec((K, bt), lambda t: (0, t)),
        interpret=interpret, **_compiler_params(platform, tiling, stages=1))(zg_p)
    return out.T[:N]


def _gates_bwd(c, g, scale, bias, spec: CoefSpec):
    """dz (N, k) from the kernel: the gradient autodiff gives through the XLA gates and Sinkhorn loop
    (mhc_jax.residual.mhc's `mappings` after the projection), on-chip."""
    n = spec.n
    k, K = n * n + 2 * n, coefficient_width(n)
    N = c.shape[0]
    g_flat = jnp.concatenate([t.reshape(N, -1).astype(jnp.float32) for t in _flat_cotangent(g, N)], axis=1)
    pad = ((0, 0), (0, K - k))
    zg = jnp.concatenate([jnp.pad(c * scale + bias, pad), jnp.pad(g_flat, pad)], axis=1)
    return _platform_call(functools.partial(gates_bwd_call, spec=spec), zg)[:, :k]


def _dot_bf16x3(a: jax.Array, b: jax.Array, subscripts: str) -> jax.Array:
    """einsum(subscripts, a, b) of float32 operands as one bfloat16 matmul with float32 accumulation over
    hi * hi + hi * mid + mid * hi (bf16_parts; ~2^-16 relative): for results stored in bfloat16, where a
    HIGHEST-precision float32 dot runs on a GPU's non-tensor cores (seen: 8x 145 us at d = 2048, H100)."""
    a_hi, a_mid, _ = bf16_parts(a.astype(jnp.float32))
    b_hi, b_mid, _ = bf16_parts(b.astype(jnp.float32))
    a3 = jnp.concatenate([a_hi, a_hi, a_mid], axis=-1)  # the contracted axis is last in a, first in b
    b3 = jnp.concatenate([b_hi, b_mid, b_hi], axis=0)
    return jnp.einsum(subscripts, a3, b3, preferred_element_type=jnp.float32)


def _coefficients_bwd(spec, res, g):
    res, g = jax.lax.optimization_barrier((res, g))  # recompute when the cotangent arrives (mhc_jax.sinkhorn)
    x_BTnC, phi, bias, a_pre, a_post, a_res, c, inv_r = res
    n = spec.n
    # Gates and Sinkhorn: recomputed from c in a kernel and differentiated through every iteration (exact
    # for the truncated loop); then z = a * c + b by hand.
    scale, b = _scale_bias(n, bias, a_pre, a_post, a_res)
    dz = _gates_bwd(c, g, scale, b, spec)
    dc = dz * scale
    dzc = jnp.sum(dz * c, axis=0)
    da_pre, da_post, da_res = jnp.sum(dzc[:n]), jnp.sum(dzc[n:2 * n]), jnp.sum(dzc[2 * n:])
    dbias = jnp.sum(dz, axis=0)
    # c = (v phi) / r, r = sqrt(mean(v^2) + eps) (Eq. 14-15): dphi = v^T (dc / r) and
    # dv = (dc / r) phi^T - (dc . c) v / (r^2 nC): two passes over the streams, no forward matmul again.
    v = x_BTnC.reshape(c.shape[0], -1)
    nC = v.shape[1]
    du = dc * inv_r
    if v.dtype == jnp.bfloat16:
        # v is exact in bfloat16: v^T (du_hi + du_mid + du_lo) is three bfloat16 products summed in float32
        # (one matmul over the parts side by side); dv is stored in bfloat16, so bf16x3 suffices for it.
        k = du.shape[1]
        d3 = jnp.einsum("nd,nk->dk", v, jnp.concatenate(bf16_parts(du), axis=1), preferred_element_type=jnp.float32)
        dphi = d3[:, :k] + d3[:, k:2 * k] + d3[:, 2 * k:]
        dv = _dot_bf16x3(du, phi.T, "nk,kd->nd")
    else:
        hi = jax.lax.Precision.HIGHEST
        dphi = jnp.einsum("nd,nk->dk", v, du, precision=hi, preferred_element_type=jnp.float32)
        dv = jnp.einsum("nk,dk->nd", du, phi.astype(jnp.float32), precision=hi, preferred_element_type=jnp.float32)
    dv = dv - (jnp.sum(dc * c, axis=1, keepdims=True) * inv_r * inv_r / nC) * v.astype(jnp.float32)
    return (dv.astype(x_BTnC.dtype).reshape(x_BTnC.shape), dphi.astype(phi.dtype), dbias.astype(bias.dtype),
            da_pre, da_post, da_res)


def _flat_cotangent(g, tokens: int):
    """Cotangents of (h_pre (..., n), h_post (..., n), h_res (..., n, n)) as (tokens, .) arrays."""
    g_pre, g_post, g_res = g
    n = g_pre.shape[-1]
    return g_pre.reshape(tokens, n), g_post.reshape(tokens, n), g_res.reshape(tokens, n, n)


_coefficients.defvjp(_coefficients_fwd, _coefficients_bwd)


def mhc_coefficients(x_BTnC: jax.Array, phi: jax.Array, bias: jax.Array, a_pre: jax.Array, a_post: jax.Array,
                     a_res: jax.Array, *, norm_eps: float, iters: int, eps: float, v4: bool):
    """(h_pre (..., n), h_post (..., n), h_res (..., n, n)), float32, of mHC paper Eq. 7-9 from the streams
    (..., n, C) in one kernel; the exact recomputing backward. h_res is the connection's native matrix
    (DeepSeek-V4: `comb`, applied transposed). Ablations are the caller's (mhc_jax.residual.base.ablate)."""
    spec = CoefSpec(n=x_BTnC.shape[-2], norm_eps=float(norm_eps), iters=int(iters), eps=float(eps), v4=bool(v4))
    f32 = jnp.float32
    return _coefficients(x_BTnC, phi, bias, jnp.asarray(a_pre, f32), jnp.asarray(a_post, f32),
                         jnp.asarray(a_res, f32), spec)


# ------------------------------------------------------------------------------------------------ mixing

def _pack(*cols: jax.Array) -> jax.Array:
    """Per-token float32 coefficients (..., k_i) side by side -> (N, next power of two >= sum k_i)."""
    flat = [c.reshape(-1, c.shape[-1]).astype(jnp.float32) if c.ndim > 1 else c for c in cols]
    cat = jnp.concatenate(flat, axis=1)
    return jnp.pad(cat, ((0, 0), (0, _pow2_at_least(cat.shape[1]) - cat.shape[1])))


def _pre_kernel(x_ref, h_ref, o_ref, *, n: int, C: int, chunk: int, loop: bool):
    h = h_ref[...]
    hp = [_column(h, j, h.shape[1], 1) for j in range(n)]

    def body(_, lo):
        acc = hp[0] * x_ref[:, pl.ds(lo, chunk)].astype(jnp.float32)
        for j in range(1, n):
            acc = acc + hp[j] * x_ref[:, pl.ds(j * C + lo, chunk)].astype(jnp.float32)
        o_ref[:, pl.ds(lo, chunk)] = acc.astype(o_ref.dtype)
        return _

    _row_chunks(0, C, chunk, loop, body, 0)


def _res_post_kernel(x_ref, y_ref, h_ref, o_ref, *, n: int, C: int, chunk: int, loop: bool, transposed: bool):
    h = h_ref[...]
    hpost = [_column(h, i, h.shape[1], 1) for i in range(n)]
    hres = [_column(h, n + k, h.shape[1], 1) for k in range(n * n)]

    def body(_, lo):
        xs = [x_ref[:, pl.ds(j * C + lo, chunk)].astype(jnp.float32) for j in range(n)]
        y = y_ref[:, pl.ds(lo, chunk)].astype(jnp.float32)
        for i in range(n):
            acc = hpost[i] * y
            for j in range(n):
                acc = acc + hres[j * n + i if transposed else i * n + j] * xs[j]
            o_ref[:, pl.ds(i * C + lo, chunk)] = acc.astype(o_ref.dtype)
        return _

    _row_chunks(0, C, chunk, loop, body, 0)


def _pre_bwd_kernel(x_ref, h_ref, g_ref, dx_ref, dh_ref, *, n: int, C: int, chunk: int, loop: bool):
    """dx_j = h_pre_j g; dh_pre_j = sum_c g x_j."""
    h = h_ref[...]
    hp = [_column(h, j, h.shape[1], 1) for j in range(n)]
    bt = x_ref.shape[0]

    def body(sums, lo):
        g = g_ref[:, pl.ds(lo, chunk)].astype(jnp.float32)
        out = []
        for j in range(n):
            dx_ref[:, pl.ds(j * C + lo, chunk)] = (hp[j] * g).astype(dx_ref.dtype)
            xj = x_ref[:, pl.ds(j * C + lo, chunk)].astype(jnp.float32)
            out.append(sums[j] + jnp.sum(g * xj, axis=1, keepdims=True))  # (bt, 1): few live registers
        return tuple(out)

    sums = _row_chunks(0, C, chunk, loop, body, tuple(jnp.zeros((bt, 1), jnp.float32) for _ in range(n)))
    dh_ref[...] = _assemble(list(sums), dh_ref.shape, 1)


def _res_post_bwd_kernel(x_ref, y_ref, h_ref, g_ref, dx_ref, dy_ref, dh_ref, *, n: int, C: int, chunk: int,
                         loop: bool, transposed: bool):
    """dx_j = sum_i A[i, j] g_i; dy = sum_i h_post_i g_i; dh_post_i = sum_c g_i y; dA[i, j] = sum_c g_i x_j
    (A the acting matrix: h_res, or its transpose)."""
    h = h_ref[...]
    hpost = [_column(h, i, h.shape[1], 1) for i in range(n)]
    hres = [_column(h, n + k, h.shape[1], 1) for k in range(n * n)]
    A = lambda i, j: hres[j * n + i if transposed else i * n + j]
    bt = x_ref.shape[0]

    def body(sums, lo):
        gs = [g_ref[:, pl.ds(i * C + lo, chunk)].astype(jnp.float32) for i in range(n)]
        xs = [x_ref[:, pl.ds(j * C + lo, chunk)].astype(jnp.float32) for j in range(n)]
        y = y_ref[:, pl.ds(lo, chunk)].astype(jnp.float32)
        dy = hpost[0] * gs[0]
        for i in range(1, n):
            dy = dy + hpost[i] * gs[i]
        dy_ref[:, pl.ds(lo, chunk)] = dy.astype(dy_ref.dtype)
        for j in range(n):
            dx = A(0, j) * gs[0]
            for i in range(1, n):
                dx = dx + A(i, j) * gs[i]
            dx_ref[:, pl.ds(j * C + lo, chunk)] = dx.astype(dx_ref.dtype)
        post = [sums[i] + jnp.sum(gs[i] * y, axis=1, keepdims=True) for i in range(n)]
        acting = [sums[n + i * n + j] + jnp.sum(gs[i] * xs[j], axis=1, keepdims=True)
                  for i in range(n) for j in range(n)]
        return tuple(post + acting)

    zeros = tuple(jnp.zeros((bt, 1), jnp.float32) for _ in range(n + n * n))
    sums = list(_row_chunks(0, C, chunk, loop, body, zeros))
    post, acting = sums[:n], sums[n:]
    native = [acting[j * n + i] if transposed else acting[i * n + j] for i in range(n) for j in range(n)]
    dh_ref[...] = _assemble(post + native, dh_ref.shape, 1)


def _mix_call(kernel, tiling: Tiling, interpret: bool, platform: str, rows: list[jax.Array],
              outs: list[tuple[int, jnp.dtype]], **kw) -> list[jax.Array]:
    """pallas_call of a mixing kernel over token blocks: every input and output an (N, width) array taken
    in (tokens, width) blocks of whole rows."""
    N = rows[0].shape[0]
    bt = min(tiling.mix_tokens, _pow2_at_least(N))
    rows = [_pad_rows(r, bt) for r in rows]
    Np = rows[0].shape[0]
    C = kw["C"]
    chunk = _chunk(C, tiling.mix_chunk)
    spec = lambda w: pl.BlockSpec((bt, w), lambda t: (t, 0))
    res = pl.pallas_call(
        functools.partial(kernel, chunk=chunk, loop=tiling.loop, **kw),
        out_shape=[jax.ShapeDtypeStruct((Np, w), dt) for w, dt in outs], grid=(Np // bt,),
        in_specs=[spec(r.shape[1]) for r in rows], out_specs=[spec(w) for w, _ in outs],
        interpret=interpret, **_compiler_params(platform, tiling))(*rows)
    return [r[:N] for r in res]


def _pre_fwd_call(tiling, interpret, platform, x_rows, h):
    N, nC = x_rows.shape
    n = h.shape[-1]
    C = nC // n
    return _mix_call(_pre_kernel, tiling, interpret, platform, [x_rows, _pack(h)], [(C, x_rows.dtype)], n=n, C=C)[0]


def _res_post_fwd_call(tiling, interpret, platform, x_rows, y_rows, h_post, h_res, *, transposed):
    n = h_post.shape[-1]
    C = y_rows.shape[1]
    return _mix_call(_res_post_kernel, tiling, interpret, platform, [x_rows, y_rows, _pack(h_post, h_res)],
                     [(n * C, x_rows.dtype)], n=n, C=C, transposed=transposed)[0]


def _pre_bwd_call(tiling, interpret, platform, x_rows, h, g_rows):
    n = h.shape[-1]
    C = g_rows.shape[1]
    hp = _pack(h)
    dx, dh = _mix_call(_pre_bwd_kernel, tiling, interpret, platform, [x_rows, hp, g_rows],
                       [(n * C, x_rows.dtype), (hp.shape[1], jnp.float32)], n=n, C=C)
    return dx, dh[:, :n]


def _res_post_bwd_call(tiling, interpret, platform, x_rows, y_rows, h_post, h_res, g_rows, *, transposed):
    n = h_post.shape[-1]
    C = y_rows.shape[1]
    hp = _pack(h_post, h_res)
    dx, dy, dh = _mix_call(_res_post_bwd_kernel, tiling, interpret, platform, [x_rows, y_rows, hp, g_rows],
                           [(n * C, x_rows.dtype), (C, y_rows.dtype), (hp.shape[1], jnp.float32)], n=n, C=C,
                           transposed=transposed)
    return dx, dy, dh[:, :n], dh[:, n:n + n * n]


@jax.custom_vjp
def _pre(x_BTnC: jax.Array, h_pre: jax.Array) -> jax.Array:
    *lead, n, C = x_BTnC.shape
    return _platform_call(_pre_fwd_call, x_BTnC.reshape(-1, n * C), h_pre.reshape(-1, n)).reshape(*lead, C)


def _pre_fwd(x_BTnC, h_pre):
    return _pre(x_BTnC, h_pre), (x_BTnC, h_pre)


def _pre_bwd(res, g):
    x_BTnC, h_pre = res
    *lead, n, C = x_BTnC.shape
    dx, dh = _platform_call(_pre_bwd_call, x_BTnC.reshape(-1, n * C), h_pre.reshape(-1, n), g.reshape(-1, C))
    return dx.reshape(x_BTnC.shape), dh.reshape(h_pre.shape).astype(h_pre.dtype)


_pre.defvjp(_pre_fwd, _pre_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _res_post(x_BTnC, y_BTC, h_post, h_res, transposed: bool):
    *lead, n, C = x_BTnC.shape
    call = functools.partial(_res_post_fwd_call, transposed=transposed)
    out = _platform_call(call, x_BTnC.reshape(-1, n * C), y_BTC.reshape(-1, C), h_post.reshape(-1, n),
                         h_res.reshape(-1, n * n))
    return out.reshape(x_BTnC.shape)


def _res_post_fwd(x_BTnC, y_BTC, h_post, h_res, transposed):
    return _res_post(x_BTnC, y_BTC, h_post, h_res, transposed), (x_BTnC, y_BTC, h_post, h_res)


def _res_post_bwd(transposed, res, g):
    x_BTnC, y_BTC, h_post, h_res = res
    *lead, n, C = x_BTnC.shape
    call = functools.partial(_res_post_bwd_call, transposed=transposed)
    dx, dy, dhp, dhr = _platform_call(call, x_BTnC.reshape(-1, n * C), y_BTC.reshape(-1, C), h_post.reshape(-1, n),
                                      h_res.reshape(-1, n * n), g.reshape(-1, n * C))
    return (dx.reshape(x_BTnC.shape), dy.reshape(y_BTC.shape), dhp.reshape(h_post.shape).astype(h_post.dtype),
            dhr.reshape(h_res.shape).astype(h_res.dtype))


_res_post.defvjp(_res_post_fwd, _res_post_bwd)


def pre_mix_pallas(x_BTnC: jax.Array, h_pre: jax.Array) -> jax.Array:
    """`mhc_jax.residual.base.pre_mix` as a kernel: H_pre x (..., C) in the stream dtype."""
    return _pre(x_BTnC, h_pre.astype(jnp.float32))


def res_post_mix_pallas(x_BTnC: jax.Array, y_BTC: jax.Array, h_post: jax.Array, h_res: jax.Array,
                        transposed: bool = False) -> jax.Array:
    """`mhc_jax.residual.base.res_post_mix` as a kernel: H_res x + H_post^T y (..., n, C), float32
    accumulation, in the stream dtype."""
    return _res_post(x_BTnC, y_BTC.astype(x_BTnC.dtype), h_post.astype(jnp.float32), h_res.astype(jnp.float32),
                     bool(transposed))

