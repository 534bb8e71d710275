"""TPU splash attention (`jax.experimental.pallas.ops.tpu.splash_attention`): a Pallas flash-attention
kernel that skips the blocks a static mask (causal, or causal within a local window) leaves empty, with
segment ids for packed documents. Off TPU it runs in Pallas interpret mode (slow; for tests only).

The kernel works on one example with head-major (H, T, D) queries and (K, T, D) grouped keys, so it is
vmapped over the batch and, under a mesh, run per shard with `jax.shard_map` (batch over the batch axes,
heads over `tensor` where they divide it): a Pallas call cannot be partitioned by XLA itself.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from jax.sharding import PartitionSpec

from mhc_jax.errors import ConfigError
from mhc_jax.sharding import logical_to_spec

LANES = 128  # the kernel's key blocks must be multiples of the TPU lane width (splash BlockSizes checks)


def splash_block(seq_len: int, block: int) -> int:
    """The largest multiple of 128 that divides `seq_len` and is at most max(block, 128)."""
    if seq_len % LANES:
        raise ConfigError(f"attention_impl='splash' needs a sequence length divisible by {LANES}, got {seq_len}; "
                          "pad data.seq_len or use attention_impl=chunked")
    sizes = [b for b in range(LANES, max(block, LANES) + 1, LANES) if seq_len % b == 0]
    return sizes[-1]


@functools.lru_cache(maxsize=32)
def _kernel(n_heads: int, seq_len: int, window: int, block: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as splash

    shape = (seq_len, seq_len)
    mask = splash.LocalMask(shape, window_size=(window - 1, 0), offset=0) if window else splash.CausalMask(shape)
    b = splash_block(seq_len, block)
    sizes = splash.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                              block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    return splash.make_splash_mha(splash.MultiHeadMask([mask] * n_heads), block_sizes=sizes, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def splash_attention(q_BTHD: jax.Array, k_BTKD: jax.Array, v_BTKD: jax.Array, segment_ids_BT: jax.Array, *,
                     window: int, block: int, interpret: bool) -> jax.Array:
    """Causal (windowed if `window` > 0) self-attention of packed rows; output shaped and typed like q."""
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, H, D = q_BTHD.shape
    K = k_BTKD.shape[2]
    mesh = jax.sharding.get_abstract_mesh()
    batch_spec = logical_to_spec(("activation_batch",), None, None if mesh.empty else mesh)[0]
    head_spec = logical_to_spec(("activation_heads",), None, None if mesh.empty else mesh)[0]
    ways = (lambda spec: 1 if spec is None or mesh.empty else int(np.prod(
        [mesh.shape[a] for a in ((spec,) if isinstance(spec, str) else spec)])))
    batch_spec = batch_spec if B % ways(batch_spec) == 0 else None
    head_spec = head_spec if H % ways(head_spec) == 0 and K % ways(head_spec) == 0 else None
    local_heads = H // ways(head_spec)

    def per_shard(q, k, v, seg):
        kernel = _kernel(local_heads, T, window, block, interpret)
        one = lambda q1, k1, v1, s1: kernel(q1, k1, v1, segment_ids=SegmentIds(q=s1, kv=s1))  # noqa: E731
        return jax.vmap(one)(q, k, v, seg)

    # The kernel does not scale the logits; heads-major layouts (B, H, T, D) and (B, K, T, D).
    q = (q_BTHD * (1.0 / np.sqrt(D))).astype(q_BTHD.dtype).transpose(0, 2, 1, 3)
    k, v = (x.transpose(0, 2, 1, 3) for x in (k_BTKD, v_BTKD))
    seg = segment_ids_BT.astype(np.int32)
    if not mesh.empty:
        qkv_spec = PartitionSpec(batch_spec, head_spec, None, None)
        per_shard = jax.shard_map(per_shard, mesh=mesh, in_specs=(qkv_spec, qkv_spec, qkv_spec,
                                                                  PartitionSpec(batch_spec, None)),
                                  out_specs=qkv_spec, check_vma=False)
    return per_shard(q, k, v, seg).transpose(0, 2, 1, 3)
