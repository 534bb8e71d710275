"""Tokenizer compression for Engram: a surjective map from raw token ids to canonical ids (engram.md).

Every token is decoded and its text normalised as the reference demo does (NFKC -> NFD -> strip accents ->
lowercase -> collapse runs of [ \\t\\r\\n] to one space -> strip; a token that is exactly one space stays a
space), so "The", "the" and "thé" share one canonical id and the n-gram tables waste no rows on spelling
variants. A token whose bytes are a partial UTF-8 sequence (byte-fallback pieces, single bytes >= 0x80)
keeps its raw token string as key, so distinct bytes stay distinct. Canonical ids are given in first-seen
order of keys, 0..V'-1.

The normaliser is the reference's own: Hugging Face `tokenizers` normalizers built exactly as
engram_demo_v1.py builds them (a re-implementation drifts: Python's str.strip() and unicodedata disagree with
the Rust normalizers on spacing combining marks such as Devanagari vowel signs and on some control
characters). Works with any tokenizer of the project (mhc_jax.data.tokenizer): it needs `vocab_size`,
`token_bytes(i)`, `id_to_piece(i)` and `is_special(i)`; a tokenizer with `token_text(i)` (a `tokenizer.json`
loaded through `tokenizers`) is decoded with it, as the demo decodes (`decode([i], skip_special_tokens=False)`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Protocol

import numpy as np

_REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 sequence decodes to (reference tests for it)


class TokenizerLike(Protocol):
    vocab_size: int

    def token_bytes(self, i: int) -> bytes: ...

    def id_to_piece(self, i: int) -> str: ...

    def is_special(self, i: int) -> bool: ...


@functools.lru_cache(maxsize=1)
def reference_normalizer() -> Any:
    """The demo's `normalizers.Sequence` (engram_demo_v1.py, CompressedTokenizer), built the same way."""
    from tokenizers import Regex, normalizers

    sentinel = "\ue000"  # shields a token that is exactly one space from Strip(), restored after it
    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), sentinel),
        normalizers.Strip(),
        normalizers.Replace(sentinel, " "),
    ])


def normalize_token_text(text: str) -> str:
    """The reference normaliser: NFKC -> NFD -> strip accents -> lowercase -> collapse [ \t\r\n]+ -> strip
    (a lone space stays), by Hugging Face `tokenizers`."""
    return reference_normalizer().normalize_str(text)


def token_text(tokenizer: TokenizerLike, i: int) -> str:
    """What the demo normalises: the token decoded alone, special tokens as their text."""
    decode = getattr(tokenizer, "token_text", None)
    if decode is not None:
        return decode(i)
    if tokenizer.is_special(i):  # our byte / SentencePiece tokenizers decode specials to b""
        return tokenizer.id_to_piece(i)
    return tokenizer.token_bytes(i).decode("utf-8", errors="replace")


def token_key(tokenizer: TokenizerLike, i: int) -> Any:
    """The key whose first appearance defines a canonical id (demo: _build_lookup_table)."""
    text = token_text(tokenizer, i)
    if _REPLACEMENT_CHAR in text:  # a partial UTF-8 sequence: keyed by the raw token string
        return tokenizer.id_to_piece(i)
    norm = normalize_token_text(text)
    return norm if norm else text


@dataclasses.dataclass(frozen=True)
class CompressedVocab:
    """lookup[raw_id] = canonical id. `size` is V' (compressed), `raw_size` is V."""

    lookup: np.ndarray  # (V,) int64
    size: int
    keys: tuple[Any, ...]  # keys[canonical_id]: the normalised text (or raw piece) of that class

    @property
    def raw_size(self) -> int:
        return int(self.lookup.shape[0])

    @property
    def reduction(self) -> float:
        """Fraction of the vocabulary removed (paper: 23.4% for a 128k tokenizer)."""
        return 1.0 - self.size / self.raw_size

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        """Raw ids of any shape -> canonical ids, int64."""
        arr = np.asarray(ids)
        if arr.size and (arr.min() < 0 or arr.max() >= self.raw_size):
            raise ValueError(f"token ids must lie in [0, {self.raw_size}), got range [{arr.min()}, {arr.max()}]")
        return self.lookup[arr.astype(np.int64, copy=False)]


def compress_tokenizer(tokenizer: TokenizerLike) -> CompressedVocab:
    """Builds the canonical id map by decoding every token of `tokenizer` (reference demo)."""
    key_to_id: dict[Any, int] = {}
    keys: list[Any] = []
    lookup = np.empty(tokenizer.vocab_size, dtype=np.int64)
    for i in range(tokenizer.vocab_size):
        key = token_key(tokenizer, i)
        cid = key_to_id.get(key)
        if cid is None:
            cid = key_to_id[key] = len(keys)
            keys.append(key)
        lookup[i] = cid
    return CompressedVocab(lookup=lookup, size=len(keys), keys=tuple(keys))


def identity_vocab(vocab_size: int) -> CompressedVocab:
    """No compression (engram.compress_tokenizer=false): every raw id is its own class."""
    return CompressedVocab(lookup=np.arange(vocab_size, dtype=np.int64), size=vocab_size,
                           keys=tuple(range(vocab_size)))
