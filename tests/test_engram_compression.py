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


def demo_normalizer():
    """engram_demo_v1.py's normaliser, written out as the demo writes it (the independent reference)."""
    from tokenizers import Regex, normalizers

    sentinel = "\uE000"
    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.NFD(), normalizers.StripAccents(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "), normalizers.Replace(Regex(r"^ $"), sentinel),
        normalizers.Strip(), normalizers.Replace(sentinel, " ")])


MULTILINGUAL = ["कि", "किताब", "हिंदी", "ΟΔΟΣ", "ὈΔΥΣΣΕΎΣ", "Σ", "\x1c a \x1f", "a\x0bb", "\x85x", "\u00a0x\u3000",
                "  \n", " ", "Straße", "İstanbul", "ǅ", "ﬁ", "Ａ１", "e\u0301", "日本語", "😀", "\u200bx"]


@pytest.mark.parametrize("text", MULTILINGUAL)
def test_normaliser_equals_the_reference_on_multilingual_text(text: str):
    assert normalize_token_text(text) == demo_normalizer().normalize_str(text)


@pytest.mark.parametrize("raw, expected", [
    ("किताब", "कतब"),  # StripAccents drops every combining mark, the spacing vowel signs (Mc) too
    ("ΟΔΟΣ", "οδοσ"),  # Lowercase maps each sigma alone: no final-sigma form (Python's str.lower() gives ς)
    ("\x85x", "x"),  # NEL is whitespace to Strip()
    ("\x1c a \x1f", "\x1c a \x1f"),  # C0 separators are not whitespace to Strip() (they are to str.strip())
])
def test_normaliser_pins_where_a_python_reimplementation_differs(raw: str, expected: str):
    assert normalize_token_text(raw) == expected


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A byte-level BPE tokenizer.json trained by `tokenizers` on multilingual text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["The café CAFÉ Café ΟΔΟΣ οδος कि किताब हिंदी Straße\tSTRASSE 日本語 \x1c ok"] * 50
    text += stdlib_prose(20_000).split("\n\n")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text, trainer)
    path = str(tmp_path_factory.mktemp("hf") / "tokenizer.json")
    tok.save(path)
    return path


def test_compressing_a_tokenizer_json_equals_the_demo_lookup_table(hf_json: str):
    from tokenizers import Tokenizer

    from mhc_jax.data.tokenizer import load_tokenizer

    ours = load_tokenizer(hf_json)
    ref_tok, norm = Tokenizer.from_file(hf_json), demo_normalizer()
    key_to_id, want = {}, []  # engram_demo_v1.py CompressedTokenizer._build_lookup_table
    for tid in range(ref_tok.get_vocab_size(with_added_tokens=True)):
        text = ref_tok.decode([tid], skip_special_tokens=False)
        key = ref_tok.id_to_token(tid) if "\ufffd" in text else (norm.normalize_str(text) or text)
        want.append(key_to_id.setdefault(key, len(key_to_id)))
    vocab = compress_tokenizer(ours)
    np.testing.assert_array_equal(vocab.lookup, np.asarray(want))
    assert vocab.size == len(key_to_id) < ours.vocab_size


def test_tokenizer_json_round_trips_and_feeds_the_engram_pipeline(hf_json: str, prose_path: str, tmp_path):
    from mhc_jax.config import Config
    from mhc_jax.data.pipeline import make_train_iterator
    from mhc_jax.data.tokenizer import load_tokenizer

    tok = load_tokenizer(hf_json)
    text = "ΟΔΟΣ किताब café 日本語 😀 \x1c"
    assert tok.decode(tok.encode(text)) == text
    assert (tok.eos_id, tok.pad_id) == (0, 1) and tok.is_special(0) and tok.token_bytes(0) == b""
    cfg = Config().replace(
        model=dict(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32),
        data=dict(dataset=f"text:{prose_path}", tokenizer=hf_json, seq_len=32, batch_size=2, data_dir=str(tmp_path)),
        engram=dict(enabled=True, layers=[1], heads_per_ngram=2, head_dim=4, table_size=61))
    batch = next(make_train_iterator(cfg))
    assert batch["inputs"].max() < tok.vocab_size and batch["engram_ids"].shape == (2, 32, 1, 4)
