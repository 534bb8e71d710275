"""Engram tokenizer compression (engram.md): normalised text classes, partial UTF-8 kept apart."""

from __future__ import annotations

import numpy as np
import pytest
from mhc_jax.data.tokenizer import ByteTokenizer, SentencePieceTokenizer, train_sentencepiece
from mhc_jax.engram.compression import compress_tokenizer, identity_vocab, normalize_token_text

from conftest import stdlib_prose


@pytest.fixture(scope="module")
def sp_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    text = stdlib_prose(100_000)  # English prose every Python install ships
    # Accented words repeated often enough that BPE gives their case/accent variants their own pieces.
    docs = text.split("\n\n") + ["café Café CAFÉ cafe résumé Résumé RÉSUMÉ"] * 300
    return train_sentencepiece(docs, 500, tmp_path_factory.mktemp("spm") / "engram.model")


@pytest.mark.parametrize("raw, expected", [
    ("Thé", "thé".replace("é", "e")),  # lowercase + strip accents
    ("\ufb01ne", "fine"),  # NFKC folds the ligature
    ("  \n\t", " "),  # whitespace-only collapses to one space, which survives the strip
    (" Hello\t\r\nWORLD  ", "hello world"),
    ("Ｈｉ", "hi"),  # full-width letters (NFKC)
])
def test_normalize_follows_reference_chain(raw: str, expected: str):
    assert normalize_token_text(raw) == expected


def test_case_and_accent_variants_share_one_id(sp_tokenizer: SentencePieceTokenizer):
    vocab = compress_tokenizer(sp_tokenizer)
    pid = {sp_tokenizer.id_to_piece(i): i for i in range(sp_tokenizer.vocab_size)}
    cafe = {int(vocab.lookup[pid[p]]) for p in ("\u2581CAFÉ", "\u2581Café", "\u2581cafe")}
    resume = {int(vocab.lookup[pid[p]]) for p in ("\u2581RÉSUMÉ", "\u2581Résumé", "\u2581résumé")}
    assert len(cafe) == 1 and len(resume) == 1 and cafe != resume
    assert vocab.lookup[pid["The"]] == vocab.lookup[pid["\u2581the"]]  # the leading space is stripped
    assert vocab.keys[vocab.lookup[pid["\u2581Café"]]] == "cafe"


def test_partial_utf8_byte_tokens_keep_distinct_ids(sp_tokenizer: SentencePieceTokenizer):
    vocab = compress_tokenizer(sp_tokenizer)
    pid = {sp_tokenizer.id_to_piece(i): i for i in range(sp_tokenizer.vocab_size)}
    high_bytes = [pid[f"<0x{b:02X}>"] for b in range(0x80, 0x100)]
    cids = vocab.lookup[high_bytes]
    assert len(set(cids.tolist())) == 128  # distinct from each other
    others = np.delete(vocab.lookup, high_bytes)
    assert not set(cids.tolist()) & set(others.tolist())  # and from every other token
    assert vocab.keys[cids[0]] == "<0x80>"  # keyed by the raw token string


def test_byte_tokenizer_folds_case_and_keeps_high_bytes_and_specials():
    tok = ByteTokenizer()
    vocab = compress_tokenizer(tok)
    assert vocab.lookup[ord("A")] == vocab.lookup[ord("a")]
    assert vocab.lookup[ord(" ")] == vocab.lookup[ord("\n")] == vocab.lookup[ord("\t")]  # one space class
    assert len(set(vocab.lookup[0x80:0x100].tolist())) == 128
    specials = vocab.lookup[[tok.bos_id, tok.eos_id, tok.pad_id]]
    assert len(set(specials.tolist())) == 3
    assert vocab.raw_size == 259 and vocab.size == 259 - 26 - 3  # A-Z fold; \t \n \r fold into space


def test_canonical_ids_are_first_seen_order_and_surjective(sp_tokenizer: SentencePieceTokenizer):
    vocab = compress_tokenizer(sp_tokenizer)
    assert set(vocab.lookup.tolist()) == set(range(vocab.size))
    # A new class takes the next id: token i never gets an id above 1 + the largest id before it.
    running_max = np.maximum.accumulate(vocab.lookup)
    assert vocab.lookup[0] == 0 and np.all(vocab.lookup[1:] <= running_max[:-1] + 1)
    assert vocab.size < vocab.raw_size == 500
    special = [i for i in range(vocab.raw_size) if sp_tokenizer.is_special(i)]
    assert len({int(vocab.lookup[i]) for i in special}) == len(special)


def test_compress_maps_arrays_and_rejects_out_of_range(sp_tokenizer: SentencePieceTokenizer):
    vocab = compress_tokenizer(sp_tokenizer)
    ids = np.array([[1, 2, 3], [4, 5, 499]])
    np.testing.assert_array_equal(vocab(ids), vocab.lookup[ids])
    with pytest.raises(ValueError, match="500"):
        vocab(np.array([500]))


def test_identity_vocab_keeps_every_id():
    vocab = identity_vocab(7)
    np.testing.assert_array_equal(vocab(np.arange(7)), np.arange(7))
    assert vocab.size == vocab.raw_size == 7 and vocab.reduction == 0.0
