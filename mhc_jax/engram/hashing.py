"""Engram n-gram hashing on the host, in numpy int64, bit-exact with the reference demo (engram.md).

For Engram layer l and order n the reference mixes the suffix n-gram of compressed ids with odd multipliers,

    mix_n = (x_t * m_0) XOR (x_{t-1} * m_1) XOR ... XOR (x_{t-n+1} * m_{n-1}),

and head k of that order takes id = mix_n mod p_{l,n,k} (all heads of one order share mix_n). JAX without
x64 cannot do this int64 arithmetic in-graph (MaxText's int32 port lost parity), so it runs here, on the
host, once per token, in the input pipeline or in generation.

Only numpy here: the data pipeline imports this module and must not pull in the model.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np

_INT64_MAX = np.iinfo(np.int64).max
LAYER_SEED_STRIDE = 10007  # reference demo: seed + 10007 * layer_id seeds each layer's multipliers


def is_prime(n: int) -> bool:
    """Deterministic Miller-Rabin for n < 3.3e24 (the bases below are a proven witness set)."""
    if n < 2:
        return False
    small = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41)
    for p in small:
        if n % p == 0:
            return n == p
    d, r = n - 1, 0
    while d % 2 == 0:
        d, r = d // 2, r + 1
    for a in small:
        x = pow(a, d, n)
        if x in (1, n - 1):
            continue
        for _ in range(r - 1):
            x = x * x % n
            if x == n - 1:
                break
        else:
            return False
    return True


def _per_order(table_base_sizes: int | Sequence[int], max_ngram: int) -> tuple[int, ...]:
    if isinstance(table_base_sizes, (int, np.integer)):
        return (int(table_base_sizes),) * (max_ngram - 1)
    sizes = tuple(int(s) for s in table_base_sizes)
    if len(sizes) != max_ngram - 1:
        raise ValueError(f"table_base_sizes={sizes} must give one base size per order 2..{max_ngram} "
                         f"({max_ngram - 1} values), or one int for all orders")
    return sizes


@functools.lru_cache(maxsize=64)
def _primes_cached(layer_ids: tuple[int, ...], max_ngram: int, heads_per_ngram: int,
                   bases: tuple[int, ...]) -> tuple[tuple[tuple[int, ...], ...], ...]:
    seen: set[int] = set()
    out = []
    for _layer in layer_ids:
        per_order = []
        for base in bases:
            heads = []
            candidate = base - 1  # reference: the search for each order restarts at base - 1
            for _ in range(heads_per_ngram):
                candidate += 1
                while candidate in seen or not is_prime(candidate):
                    candidate += 1
                seen.add(candidate)
                heads.append(candidate)
            per_order.append(tuple(heads))
        out.append(tuple(per_order))
    return tuple(out)


def engram_primes(layer_ids: Sequence[int], max_ngram: int, heads_per_ngram: int,
                  table_base_sizes: int | Sequence[int]) -> dict[int, np.ndarray]:
    """{layer_id: int64 array (max_ngram - 1, heads_per_ngram)} of table sizes. For each layer (in the given
    order), each order, the next `heads_per_ngram` primes >= base that no earlier (layer, order, head) took
    (reference demo). Needs no tokenizer, so the model can size its tables from the config alone."""
    if max_ngram < 2:
        raise ValueError(f"max_ngram={max_ngram} must be >= 2 (orders 2..max_ngram)")
    if heads_per_ngram < 1:
        raise ValueError(f"heads_per_ngram={heads_per_ngram} must be >= 1")
    bases = _per_order(table_base_sizes, max_ngram)
    if min(bases) < 2:
        raise ValueError(f"table_base_sizes={bases} must all be >= 2")
    layers = tuple(int(layer) for layer in layer_ids)
    if len(set(layers)) != len(layers):
        raise ValueError(f"layer_ids={layers} must not repeat")
    table = _primes_cached(layers, max_ngram, heads_per_ngram, bases)
    return {layer: np.asarray(p, dtype=np.int64) for layer, p in zip(layers, table)}


def layer_multipliers(compressed_vocab_size: int, layer_id: int, max_ngram: int, seed: int) -> np.ndarray:
    """The reference's odd int64 multipliers m_0..m_{max_ngram-1} for one layer. They stay below
    int64_max // V', so x * m (x < V') never overflows."""
    half_bound = max(1, _INT64_MAX // compressed_vocab_size // 2)
    rng = np.random.default_rng(int(seed + LAYER_SEED_STRIDE * int(layer_id)))
    return rng.integers(0, half_bound, size=(max_ngram,), dtype=np.int64) * 2 + 1


def run_starts(segment_ids_BT: np.ndarray) -> np.ndarray:
    """Index of the first position of the document each position belongs to (a document is a maximal run
    of equal segment ids), shape (B, T) int64."""
    seg = np.asarray(segment_ids_BT)
    T = seg.shape[1]
    t = np.arange(T, dtype=np.int64)
    boundary = np.ones(seg.shape, dtype=bool)
    boundary[:, 1:] = seg[:, 1:] != seg[:, :-1]
    return np.maximum.accumulate(np.where(boundary, t, 0), axis=1)


class NgramHasher:
    """Maps compressed ids (B, T) to int64 table ids (B, T, (max_ngram - 1) * heads_per_ngram) per layer,
    ordered as the reference: all heads of 2-grams, then all heads of 3-grams, ... Head k of order n gives
    an id in [0, primes[layer][n - 2, k])."""

    def __init__(self, compressed_vocab_size: int, layer_ids: Sequence[int], max_ngram: int = 3,
                 heads_per_ngram: int = 8, *, table_base_sizes: int | Sequence[int], seed: int = 0,
                 pad_id: int):
        if compressed_vocab_size < 1:
            raise ValueError(f"compressed_vocab_size={compressed_vocab_size} must be >= 1")
        if not 0 <= pad_id < compressed_vocab_size:
            raise ValueError(f"pad_id={pad_id} must be a compressed id in [0, {compressed_vocab_size})")
        self.vocab_size = int(compressed_vocab_size)
        self.layer_ids = tuple(int(layer) for layer in layer_ids)
        self.max_ngram = int(max_ngram)
        self.heads_per_ngram = int(heads_per_ngram)
        self.pad_id = int(pad_id)
        self.seed = int(seed)
        self.primes = engram_primes(self.layer_ids, self.max_ngram, self.heads_per_ngram, table_base_sizes)
        self.multipliers = {layer: layer_multipliers(self.vocab_size, layer, self.max_ngram, self.seed)
                            for layer in self.layer_ids}

    @property
    def ids_per_position(self) -> int:
        return (self.max_ngram - 1) * self.heads_per_ngram

    def __call__(self, ids_BT: np.ndarray, layer_id: int,
                 segment_ids_BT: np.ndarray | None = None) -> np.ndarray:
        """Table ids (B, T, G) int64, G = (max_ngram - 1) * heads_per_ngram. With `segment_ids_BT`, a token of
        another document counts as pad, so no n-gram reaches across a document boundary (the reference demo
        has none)."""
        if layer_id not in self.multipliers:
            raise ValueError(f"layer_id={layer_id} is not an Engram layer; configured: {self.layer_ids}")
        x = np.asarray(ids_BT)
        if x.ndim != 2:
            raise ValueError(f"ids must have shape (batch, time), got {x.shape}")
        x = x.astype(np.int64, copy=False)
        if x.size and (x.min() < 0 or x.max() >= self.vocab_size):
            raise ValueError(f"compressed ids must lie in [0, {self.vocab_size}), got range "
                             f"[{x.min()}, {x.max()}] (compress raw token ids first)")
        B, T = x.shape
        t_T = np.arange(T, dtype=np.int64)
        first_BT = np.zeros((B, T), np.int64) if segment_ids_BT is None else run_starts(segment_ids_BT)
        if segment_ids_BT is not None and np.shape(segment_ids_BT) != (B, T):
            raise ValueError(f"segment_ids shape {np.shape(segment_ids_BT)} must equal ids shape {(B, T)}")
        m = self.multipliers[layer_id]
        primes = self.primes[layer_id]
        mix_BT = x * m[0]
        out = []
        for k in range(1, self.max_ngram):  # one step per n-gram order, vectorised over tokens
            shifted_BT = np.full((B, T), self.pad_id, np.int64)
            if k < T:
                shifted_BT[:, k:] = x[:, :T - k]
            shifted_BT = np.where(t_T[None, :] - k >= first_BT, shifted_BT, self.pad_id)
            mix_BT = np.bitwise_xor(mix_BT, shifted_BT * m[k])
            out.append(mix_BT[:, :, None] % primes[k - 1][None, None, :])
        return np.concatenate(out, axis=2)
