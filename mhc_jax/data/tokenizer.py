"""Tokenizers: a byte-level one (the default, needs no training) and SentencePiece BPE trained by a command.

Both implement the `Tokenizer` protocol and round-trip exactly: `decode(encode(text)) == text` for every
valid Unicode string, including characters never seen in training (SentencePiece falls back to byte
pieces; no normalisation; whitespace kept as is).

Byte tokenizer ids: 0..255 are the bytes of the UTF-8 encoding, 256 = BOS, 257 = EOS, 258 = PAD, so
vocab_size = 259 (the config default `model.vocab_size`).

Train a SentencePiece model on any configured dataset:

    python -m mhc_jax.data.tokenizer train --dataset pystdlib --vocab-size 4096 --out spm/pystdlib4k.model

and point `data.tokenizer` at the written `.model` file.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable, Sequence
from typing import Protocol, runtime_checkable

from mhc_jax.cli import entry_point
from mhc_jax.errors import ConfigError, DataError

BYTE_VOCAB_SIZE = 259
BYTE_BOS_ID, BYTE_EOS_ID, BYTE_PAD_ID = 256, 257, 258
SPM_UNK_ID, SPM_BOS_ID, SPM_EOS_ID, SPM_PAD_ID = 0, 1, 2, 3

# SentencePiece writes spaces as U+2581 and maps that symbol back to a space on decode, so a literal U+2581
# in the text would come back as a space; we split it out and encode it as its three UTF-8 byte pieces.
_SPM_SPACE = "\u2581"


@runtime_checkable
class Tokenizer(Protocol):
    """What the pipeline, Engram hashing and generation need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without BOS/EOS."""
        ...

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; special ids are skipped, invalid UTF-8 is replaced with U+FFFD."""
        ...

    def id_to_piece(self, i: int) -> str:
        """The raw token string, e.g. '<0xC3>' for a byte piece, '▁the' for a SentencePiece word."""
        ...

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` decodes to; b'' for special tokens."""
        ...

    def is_special(self, i: int) -> bool:
        ...


def _check_id(i: int, vocab_size: int) -> int:
    i = int(i)
    if not 0 <= i < vocab_size:
        raise ValueError(f"token id {i} is out of range: must be in [0, {vocab_size})")
    return i


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, then BOS=256, EOS=257, PAD=258."""

    vocab_size: int = BYTE_VOCAB_SIZE
    bos_id: int = BYTE_BOS_ID
    eos_id: int = BYTE_EOS_ID
    pad_id: int = BYTE_PAD_ID
    name: str = "byte"

    _SPECIAL_PIECES = {BYTE_BOS_ID: "<s>", BYTE_EOS_ID: "</s>", BYTE_PAD_ID: "<pad>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        i = _check_id(i, self.vocab_size)
        return self._SPECIAL_PIECES.get(i, f"<0x{i:02X}>")

    def token_bytes(self, i: int) -> bytes:
        i = _check_id(i, self.vocab_size)
        return bytes([i]) if i < 256 else b""

    def is_special(self, i: int) -> bool:
        return _check_id(i, self.vocab_size) >= 256

    def __repr__(self) -> str:
        return "ByteTokenizer(vocab_size=259)"


class TokenizerFileMissing(ConfigError, FileNotFoundError):
    """data.tokenizer names a .model file that does not exist (a ConfigError, and the FileNotFoundError
    that file-based callers expect)."""


class SentencePieceTokenizer:
    """A SentencePiece model trained by `train_sentencepiece` (byte fallback, identity normalisation).

    UNK=0, BOS=1, EOS=2, PAD=3; byte pieces '<0x00>'..'<0xFF>' follow. Decoding is done here from
    `token_bytes` so that it is exact and independent of SentencePiece's own detokenizer.
    """

    def __init__(self, path: str | os.PathLike):
        import sentencepiece as spm

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerFileMissing(
                f"SentencePiece model {path!r} does not exist; train one with `python -m "
                f"mhc_jax.data.tokenizer train --dataset pystdlib --vocab-size 4096 --out {path}` "
                f"or set data.tokenizer=byte")
        self.name = path
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.Load(path)
        except (OSError, RuntimeError) as err:
            raise ConfigError(f"{path!r} is not a SentencePiece model file ({err}); give a .model file "
                             f"written by `python -m mhc_jax.data.tokenizer train` or data.tokenizer=byte") from err
        self.vocab_size = int(self._sp.GetPieceSize())
        self.bos_id, self.eos_id, self.pad_id = (int(self._sp.bos_id()), int(self._sp.eos_id()),
                                                 int(self._sp.pad_id()))
        for role, value in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if value < 0:
                raise ConfigError(f"SentencePiece model {path!r} has no {role} token; retrain it with "
                                 f"`python -m mhc_jax.data.tokenizer train` (which defines BOS, EOS and PAD)")
        if self._sp.PieceToId("<0xE2>") == self._sp.unk_id():
            raise ConfigError(f"SentencePiece model {path!r} was trained without byte_fallback, so it cannot "
                             f"round-trip unseen text; retrain it with `python -m mhc_jax.data.tokenizer train`")
        self._space_bytes = [self._sp.PieceToId(f"<0x{b:02X}>") for b in _SPM_SPACE.encode("utf-8")]
        # Precomputed per-id tables: decoding and Engram compression read every token many times.
        self._special = [bool(self._sp.IsControl(i) or self._sp.IsUnknown(i)) for i in range(self.vocab_size)]
        self._bytes = [self._piece_bytes(i) for i in range(self.vocab_size)]

    def __getstate__(self) -> dict:
        # Grain worker processes receive the tokenizer pickled; the SentencePiece processor is reloaded.
        return {"path": self.name}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["path"])

    def _piece_bytes(self, i: int) -> bytes:
        if self._special[i]:
            return b""
        piece = self._sp.IdToPiece(i)
        if self._sp.IsByte(i):
            return bytes([int(piece[3:5], 16)])
        return piece.replace(_SPM_SPACE, " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        if _SPM_SPACE not in text:
            return list(self._sp.EncodeAsIds(text))
        ids: list[int] = []
        for k, part in enumerate(text.split(_SPM_SPACE)):
            if k:
                ids.extend(self._space_bytes)
            if part:
                ids.extend(self._sp.EncodeAsIds(part))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        table = self._bytes
        n = self.vocab_size
        return b"".join(table[int(i)] for i in ids if 0 <= int(i) < n).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        return self._sp.IdToPiece(_check_id(i, self.vocab_size))

    def token_bytes(self, i: int) -> bytes:
        return self._bytes[_check_id(i, self.vocab_size)]

    def is_special(self, i: int) -> bool:
        return self._special[_check_id(i, self.vocab_size)]

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer({self.name!r}, vocab_size={self.vocab_size})"


def load_tokenizer(name_or_path: str) -> ByteTokenizer | SentencePieceTokenizer:
    """`"byte"` -> ByteTokenizer; a path to a `.model` file -> SentencePieceTokenizer."""
    if name_or_path == "byte":
        return ByteTokenizer()
    if not name_or_path:
        raise ConfigError("data.tokenizer is empty; use 'byte' or a path to a SentencePiece .model file")
    return SentencePieceTokenizer(os.path.expanduser(name_or_path))


def train_sentencepiece(documents: Iterable[str], vocab_size: int, out_path: str | os.PathLike, *,
                        max_chars: int = 50_000_000, model_type: str = "bpe") -> SentencePieceTokenizer:
    """Trains a byte-fallback BPE model on `documents` (at most `max_chars` characters) and writes
    `out_path` (a `.model` file; the `.vocab` listing is written beside it)."""
    import sentencepiece as spm

    out_path = os.fspath(out_path)
    if vocab_size < 300:
        raise ConfigError(f"vocab_size={vocab_size} is too small: a byte-fallback model needs 4 special + 256 "
                         f"byte pieces plus the corpus' characters; use >= 300 (e.g. 4096)")

    def capped() -> Iterable[str]:
        total = 0
        for doc in documents:
            # Training splits on whitespace, so long documents are fine; only empty ones are dropped.
            if doc:
                yield doc
                total += len(doc)
                if total >= max_chars:
                    return

    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    prefix = out_path[:-len(".model")] if out_path.endswith(".model") else out_path
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(capped()), model_prefix=prefix, vocab_size=vocab_size,
            model_type=model_type, byte_fallback=True, character_coverage=1.0,
            normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
            allow_whitespace_only_pieces=True, split_digits=True, max_sentence_length=1 << 24,
            unk_id=SPM_UNK_ID, bos_id=SPM_BOS_ID, eos_id=SPM_EOS_ID, pad_id=SPM_PAD_ID,
            minloglevel=2, num_threads=os.cpu_count() or 1)
    except RuntimeError as err:
        raise DataError(f"SentencePiece training for {out_path!r} failed: {err}") from err
    if prefix != out_path:
        os.replace(prefix + ".model", out_path)
    return SentencePieceTokenizer(out_path)


@entry_point
def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mhc_jax.data.tokenizer",
                                     description="Train a SentencePiece BPE tokenizer on a dataset.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a byte-fallback BPE model and write a .model file")
    train.add_argument("--dataset", default="pystdlib", help="pystdlib, text:PATH or tfds:NAME")
    train.add_argument("--data-dir", default="", help="TFDS data_dir ('' = $MHC_JAX_DATA_DIR or "
                                                      "~/.cache/mhc_jax/tfds)")
    train.add_argument("--split", default="train")
    train.add_argument("--text-key", default="text", help="feature holding the text (tfds: datasets)")
    train.add_argument("--vocab-size", type=int, default=4096)
    train.add_argument("--max-chars", type=int, default=50_000_000, help="train on at most this many chars")
    train.add_argument("--out", required=True, help="path of the .model file to write")
    args = parser.parse_args(argv)

    from mhc_jax.data.corpus import open_text_source

    source = open_text_source(args.dataset, args.split, data_dir=args.data_dir, text_key=args.text_key)
    tok = train_sentencepiece((source[i] for i in range(len(source))), args.vocab_size, args.out,
                              max_chars=args.max_chars)
    print(f"wrote {args.out}: vocab_size={tok.vocab_size} (set data.tokenizer={args.out} and "
          f"model.vocab_size={tok.vocab_size})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
