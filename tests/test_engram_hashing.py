"""Engram hashing: bit-exact with the reference formula (engram.md), primes, document boundaries."""

from __future__ import annotations

import numpy as np
import pytest

from mhc_jax.engram.hashing import NgramHasher, engram_primes, is_prime

DEMO_BASE = 5 * 129280  # engram_demo_v1.py: engram_vocab_size = [129280 * 5] * 2


def _trial_division_prime(n: int) -> bool:
    if n < 2:
        return False
    d = 2
    while d * d <= n:
        if n % d == 0:
            return False
        d += 1
    return True


def reference_primes(layers, max_ngram, K, base):
    """engram.md: per layer (config order), per order, from base - 1 the next K primes never used before."""
    seen, out = set(), {}
    for layer in layers:
        per_order = []
        for _ in range(2, max_ngram + 1):
            heads, c = [], base - 1
            for _ in range(K):
                c += 1
                while c in seen or not _trial_division_prime(c):
                    c += 1
                seen.add(c)
                heads.append(c)
            per_order.append(heads)
        out[layer] = per_order
    return out


def reference_hash(ids_BT, seg_BT, V, layers, layer, max_ngram, K, base, seed, pad):
    """A per-position loop written straight from engram.md, in Python integers (no overflow possible),
    with positions of another document counting as pad."""
    primes = reference_primes(layers, max_ngram, K, base)[layer]
    rng = np.random.default_rng(seed + 10007 * layer)
    half = max(1, (2**63 - 1) // V // 2)
    m = [int(v) * 2 + 1 for v in rng.integers(0, half, size=max_ngram, dtype=np.int64)]
    B, T = ids_BT.shape
    out = np.zeros((B, T, (max_ngram - 1) * K), np.int64)
    for b in range(B):
        for t in range(T):
            def tok(k: int) -> int:
                s = t - k
                if s < 0 or any(seg_BT[b, j] != seg_BT[b, t] for j in range(s, t + 1)):
                    return pad
                return int(ids_BT[b, s])
            col = 0
            for n in range(2, max_ngram + 1):
                mix = 0
                for k in range(n):
                    mix ^= tok(k) * m[k]
                assert mix < 2**63  # the reference relies on int64 never overflowing
                for p in primes[n - 2]:
                    out[b, t, col] = mix % p
                    col += 1
    return out


@pytest.mark.parametrize("max_ngram", [2, 3, 4])
def test_hash_equals_per_position_reference_loop(max_ngram: int):
    V, K, base, layers, pad = 1000, 3, 101, (1, 15, 4), 2
    rng = np.random.default_rng(max_ngram)
    ids = rng.integers(0, V, (2, 11))
    seg = np.ones_like(ids)
    hasher = NgramHasher(V, layers, max_ngram, K, table_base_sizes=base, seed=0, pad_id=pad)
    for layer in layers:
        got = hasher(ids, layer)
        assert got.dtype == np.int64 and got.shape == (2, 11, (max_ngram - 1) * K)
        np.testing.assert_array_equal(got, reference_hash(ids, seg, V, layers, layer, max_ngram, K, base, 0, pad))


def test_hash_equals_reference_at_demo_scale_with_large_vocab():
    # Demo sizes: V' close to the 129280-token tokenizer, so multipliers use nearly the full int64 range.
    V, layers = 98000, (1, 15)
    ids = np.random.default_rng(0).integers(0, V, (1, 9))
    hasher = NgramHasher(V, layers, 3, 8, table_base_sizes=DEMO_BASE, seed=0, pad_id=2)
    np.testing.assert_array_equal(hasher(ids, 15), reference_hash(ids, np.ones_like(ids), V, layers, 15, 3, 8,
                                                                  DEMO_BASE, 0, 2))


def test_demo_layer1_bigram_primes_match_published_values():
    primes = engram_primes((1, 15), 3, 8, DEMO_BASE)
    np.testing.assert_array_equal(primes[1][0], [646403, 646411, 646421, 646423, 646433, 646453, 646519, 646523])


def test_primes_are_distinct_prime_and_above_base_across_layers_orders_heads():
    layers, base = (2, 6, 11), 4093
    primes = engram_primes(layers, 4, 5, base)
    flat = np.concatenate([primes[layer].reshape(-1) for layer in layers])
    assert len(set(flat.tolist())) == flat.size == 3 * 3 * 5
    assert all(_trial_division_prime(int(p)) and p >= base for p in flat)
    np.testing.assert_array_equal(primes[2], np.asarray(reference_primes(layers, 4, 5, base)[2]))


def test_ngrams_never_cross_document_boundaries():
    V, layers, pad = 300, (0, 3), 7
    hasher = NgramHasher(V, layers, 3, 4, table_base_sizes=97, seed=5, pad_id=pad)
    rng = np.random.default_rng(1)
    ids = rng.integers(0, V, (2, 12))
    seg = np.array([[1] * 5 + [2] * 4 + [3] * 3, [4] * 12])
    for layer in layers:
        got = hasher(ids, layer, segment_ids_BT=seg)
        np.testing.assert_array_equal(got, reference_hash(ids, seg, V, layers, layer, 3, 4, 97, 5, pad))
        # Each document hashes exactly as if it stood alone at the start of a row.
        for start, stop in [(0, 5), (5, 9), (9, 12)]:
            alone = hasher(ids[:1, start:stop], layer)
            np.testing.assert_array_equal(got[:1, start:stop], alone)


def test_ids_lie_below_each_heads_prime():
    hasher = NgramHasher(500, (1,), 3, 8, table_base_sizes=211, pad_id=0)
    got = hasher(np.random.default_rng(2).integers(0, 500, (4, 64)), 1)
    primes = hasher.primes[1].reshape(-1)
    assert got.min() >= 0 and np.all(got < primes[None, None, :])


def test_out_of_range_ids_raise_clear_error():
    hasher = NgramHasher(10, (1,), 3, 2, table_base_sizes=11, pad_id=0)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        hasher(np.array([[3, 10]]), 1)


def test_is_prime_agrees_with_trial_division():
    assert [n for n in range(2000) if is_prime(n)] == [n for n in range(2000) if _trial_division_prime(n)]
    assert is_prime(2**61 - 1) and not is_prime((2**31 - 1) * (2**61 - 1))


def _ids_cfg():
    from mhc_jax.config import Config
    return Config().replace(engram=dict(enabled=True, layers=[3, 1], heads_per_ngram=4, table_size=211),
                            model=dict(n_layers=4))


def test_engram_ids_stack_layers_in_config_order_as_int32():
    from mhc_jax.data.tokenizer import ByteTokenizer
    from mhc_jax.engram.ids import EngramIds
    tok = ByteTokenizer()
    engram_ids = EngramIds(_ids_cfg().engram, tok)
    tokens = np.array([tok.encode("The cat sat on THE mat."), tok.encode("the cat sat on the mat!")])
    got = engram_ids(tokens)
    assert got.dtype == np.int32 and got.shape == (2, tokens.shape[1], 2, 2 * 4)
    compressed = engram_ids.vocab(tokens)
    for j, layer in enumerate((3, 1)):
        np.testing.assert_array_equal(got[:, :, j], engram_ids.hasher(compressed, layer))
    # Case folding: the two rows agree wherever the last max_ngram characters agree up to case.
    np.testing.assert_array_equal(got[0, :-1], got[1, :-1])
    assert engram_ids.pad_id == engram_ids.vocab.lookup[tok.pad_id]


def test_generation_ids_of_last_token_equal_training_ids():
    from mhc_jax.data.tokenizer import ByteTokenizer
    from mhc_jax.engram.ids import EngramIds
    tok = ByteTokenizer()
    engram_ids = EngramIds(_ids_cfg().engram, tok)
    tokens = np.array([tok.encode("Only Alexander the Great could tame the horse.")])
    training = engram_ids(tokens)
    for t in range(1, tokens.shape[1] + 1):  # generation: the history grows one token at a time
        np.testing.assert_array_equal(engram_ids(tokens[:, :t])[:, -1], training[:, t - 1])
        np.testing.assert_array_equal(engram_ids.last(tokens[:, :t])[:, 0], training[:, t - 1])
    np.testing.assert_array_equal(engram_ids.last(tokens, n_new=5), training[:, -5:])


def test_engram_ids_respect_segments_of_packed_rows():
    from mhc_jax.data.tokenizer import ByteTokenizer
    from mhc_jax.engram.ids import EngramIds
    tok = ByteTokenizer()
    engram_ids = EngramIds(_ids_cfg().engram, tok)
    a, b = tok.encode("first doc"), tok.encode("second")
    packed = np.array([a + b])
    seg = np.array([[1] * len(a) + [2] * len(b)])
    got = engram_ids(packed, seg)
    np.testing.assert_array_equal(got[:, len(a):], engram_ids(np.array([b])))
    assert not np.array_equal(engram_ids(packed)[:, len(a):], engram_ids(np.array([b])))
