"""Tokenizers: exact round trips on any text (including text never seen in training), the byte id layout,
special tokens, and the SentencePiece training command."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc_jax.data.tokenizer import (BYTE_VOCAB_SIZE, ByteTokenizer, SentencePieceTokenizer, load_tokenizer, main,
                                    train_sentencepiece)

from conftest import PROSE_FILE, stdlib_prose

# Characters the prose-trained model never saw: CJK, emoji, combining marks, controls, the
# SentencePiece space symbol U+2581 itself, a lone NUL.
UNSEEN = ["日本語のテキスト", "emoji 🙂👍🏽", "e\u0301 \u0000 \t\r\n", "a\u2581b \u2581\u2581", "  two  spaces  ",
          "\ufeffBOM", "ﬁ ligature", ""]
ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=200)


@pytest.fixture(scope="module")
def spm_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    # Trained on the first 300k characters of the stdlib's English prose; the rest is held out.
    out = tmp_path_factory.mktemp("spm") / "prose.model"
    return train_sentencepiece(stdlib_prose(300_000).split("\n\n"), 600, out)


@settings(max_examples=50, deadline=None)
@given(ANY_TEXT)
def test_byte_tokenizer_round_trips_any_text(text: str) -> None:
    tok = ByteTokenizer()
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_byte_ids_are_utf8_bytes_then_bos_eos_pad() -> None:
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (BYTE_VOCAB_SIZE, 256, 257, 258)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.id_to_piece(0xC3) == "<0xC3>"
    assert tok.token_bytes(0xC3) == b"\xc3"
    assert [tok.is_special(i) for i in (0, 255, 256, 257, 258)] == [False, False, True, True, True]
    assert [tok.token_bytes(i) for i in (256, 257, 258)] == [b"", b"", b""]
    with pytest.raises(ValueError, match="259"):
        tok.token_bytes(259)


def test_byte_decode_skips_special_ids_and_replaces_invalid_utf8() -> None:
    tok = ByteTokenizer()
    assert tok.decode([256, *b"hi", 257, 258]) == "hi"
    assert tok.decode([0xC3]) == "\ufffd"


@settings(max_examples=50, deadline=None)
@given(ANY_TEXT)
def test_sentencepiece_round_trips_any_text(spm_tokenizer: SentencePieceTokenizer, text: str) -> None:
    ids = spm_tokenizer.encode(text)
    assert spm_tokenizer.decode(ids) == text
    assert all(not spm_tokenizer.is_special(i) for i in ids)


@pytest.mark.parametrize("text", UNSEEN)
def test_sentencepiece_round_trips_unseen_characters(spm_tokenizer: SentencePieceTokenizer, text: str) -> None:
    ids = spm_tokenizer.encode(text)
    assert spm_tokenizer.decode(ids) == text
    # token_bytes is what Engram's tokenizer compression reads: it must spell the exact UTF-8 bytes.
    assert b"".join(spm_tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8")


def test_sentencepiece_unseen_character_falls_back_to_byte_pieces(spm_tokenizer: SentencePieceTokenizer) -> None:
    ids = spm_tokenizer.encode("語")
    assert [spm_tokenizer.id_to_piece(i) for i in ids] == ["<0xE8>", "<0xAA>", "<0x9E>"]


def test_sentencepiece_special_tokens_decode_to_nothing(spm_tokenizer: SentencePieceTokenizer) -> None:
    tok = spm_tokenizer
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (600, 1, 2, 3)
    for i in (0, tok.bos_id, tok.eos_id, tok.pad_id):
        assert tok.is_special(i) and tok.token_bytes(i) == b""
    assert tok.decode([tok.bos_id, *tok.encode("To be"), tok.eos_id, tok.pad_id]) == "To be"


def test_sentencepiece_merges_frequent_text(spm_tokenizer: SentencePieceTokenizer) -> None:
    # Held-out English from the same corpus needs far fewer BPE tokens than bytes.
    held_out = stdlib_prose()[-20_000:]
    assert len(spm_tokenizer.encode(held_out)) < 0.6 * len(held_out.encode("utf-8"))


def test_sentencepiece_tokenizer_survives_pickling(spm_tokenizer: SentencePieceTokenizer) -> None:
    clone = pickle.loads(pickle.dumps(spm_tokenizer))
    assert clone.encode("What light through yonder") == spm_tokenizer.encode("What light through yonder")


def test_train_command_writes_a_model_that_load_tokenizer_reads(tmp_path: Path) -> None:
    out = tmp_path / "tok" / "ts.model"
    assert main(["train", "--dataset", f"text:{PROSE_FILE}", "--data-dir", str(tmp_path / "tfds"),
                 "--vocab-size", "400", "--max-chars", "200000", "--out", str(out)]) == 0
    tok = load_tokenizer(str(out))
    assert tok.vocab_size == 400
    assert tok.decode(tok.encode("Romeo, Romeo! 日本")) == "Romeo, Romeo! 日本"


def test_missing_tokenizer_path_names_the_file_and_the_fix(tmp_path: Path) -> None:
    missing = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*mhc_jax\.data\.tokenizer train"):
        load_tokenizer(str(missing))


def test_a_file_that_is_not_a_sentencepiece_model_is_rejected(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.model"
    bogus.write_text("not a model")
    with pytest.raises(ValueError, match="bogus.model"):
        load_tokenizer(str(bogus))


def test_too_small_vocab_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_sentencepiece(["some text"], 100, tmp_path / "x.model")
