"""Text datasets as TFDS `array_record` datasets (TensorFlow is never imported) and random-access readers.

`data.dataset` names one of three kinds:

* `pystdlib` (default): the Python standard library's own `*.py` source files, found through
  `sysconfig.get_paths()["stdlib"]`: real text present offline wherever the project can run. Test
  directories (`test`, `tests`, `idle_test`) and `site-packages` are skipped (tests hold deliberately odd
  files); empty files and files that are not UTF-8 are skipped. Files are read in sorted path order and the
  corpus is capped at the first `data.corpus_max_mb` MB (CPython 3.11 without tests: ~12 MB, 734 files), so
  building it takes seconds. One document per file.
* `text:PATH`: a local UTF-8 file or a folder of them (every non-hidden file, recursively, sorted). Each
  file is cut into documents of whole paragraphs (blank-line separated) of at most `data.doc_chars`
  characters (longer paragraphs at line ends, longer lines at `doc_chars`), so a single-file corpus such as
  Tiny Shakespeare still has many documents and a non-empty validation split. The documents of a file
  concatenate back to the file exactly.
* `tfds:NAME` (e.g. `tfds:tiny_shakespeare`, `tfds:lm1b`, `tfds:c4/en`): a catalog dataset already
  prepared in `array_record` format under `data.data_dir`; feature `data.text_key` holds the text.

The two local builders split by document hash: sha1(key) % 100 < 2 goes to `validation`, and if no
document lands there the one with the smallest hash does, so validation is never empty. Datasets are
written to `data_dir` ("" means $MHC_JAX_DATA_DIR, else ~/.cache/mhc_jax/tfds) under a config name that
fingerprints their inputs (Python version and cap; file paths, sizes and mtimes), so an edited file is
rebuilt and an unchanged one is read back.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import re
import sys
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import tensorflow_datasets as tfds

from mhc_jax.errors import DataError  # re-exported for the data package

log = logging.getLogger(__name__)

DATA_DIR_ENV = "MHC_JAX_DATA_DIR"
DEFAULT_DATA_DIR = "~/.cache/mhc_jax/tfds"
VALIDATION_PERCENT = 2  # sha1(key) % 100 < 2 -> validation
_SKIPPED_STDLIB_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages",
                                  "__pycache__"})


def resolve_data_dir(data_dir: str = "") -> str:
    """`data.data_dir`, else $MHC_JAX_DATA_DIR, else ~/.cache/mhc_jax/tfds (expanded, absolute)."""
    chosen = data_dir or os.environ.get(DATA_DIR_ENV, "") or DEFAULT_DATA_DIR
    return os.path.abspath(os.path.expanduser(chosen))


def _hash_int(key: str) -> int:
    return int.from_bytes(hashlib.sha1(key.encode("utf-8")).digest()[:8], "big")


def validation_mask(keys: Sequence[str]) -> list[bool]:
    """True for the documents of the validation split: sha1(key) % 100 < 2, and at least one."""
    hashes = [_hash_int(k) for k in keys]
    mask = [h % 100 < VALIDATION_PERCENT for h in hashes]
    if keys and not any(mask):
        mask[min(range(len(keys)), key=hashes.__getitem__)] = True
    return mask


# --------------------------------------------------------------------------------------------------
# Documents
# --------------------------------------------------------------------------------------------------

_PARAGRAPH_END = re.compile(r"\n[ \t\r\f\v]*\n")


def _pieces(text: str, doc_chars: int) -> Iterator[str]:
    """Paragraphs (each with its trailing blank lines); a paragraph over `doc_chars` is cut at line ends,
    a line over `doc_chars` every `doc_chars` characters. The pieces concatenate to `text`."""
    start = 0
    for m in _PARAGRAPH_END.finditer(text):
        # Extend over every following blank line so separators stay with the paragraph before them.
        end = m.end()
        while end < len(text) and text[end] == "\n":
            end += 1
        if end > start:
            yield from _cut(text[start:end], doc_chars)
            start = end
    if start < len(text):
        yield from _cut(text[start:], doc_chars)


def _cut(paragraph: str, doc_chars: int) -> Iterator[str]:
    if len(paragraph) <= doc_chars:
        yield paragraph
        return
    for line in paragraph.splitlines(keepends=True):
        for i in range(0, len(line), doc_chars):
            yield line[i:i + doc_chars]


def split_documents(text: str, doc_chars: int) -> list[str]:
    """`text` as documents of whole paragraphs, each at most `doc_chars` characters (greedy); the
    documents concatenate back to `text` exactly."""
    if doc_chars < 1:
        raise ValueError(f"doc_chars={doc_chars} must be >= 1")
    docs: list[str] = []
    current: list[str] = []
    size = 0
    for piece in _pieces(text, doc_chars):
        if current and size + len(piece) > doc_chars:
            docs.append("".join(current))
            current, size = [], 0
        current.append(piece)
        size += len(piece)
    if current:
        docs.append("".join(current))
    return docs


def read_utf8(path: Path, *, hint: str = "") -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not valid UTF-8 (byte {err.start}: {data[err.start:err.start + 4]!r}); "
                        f"text datasets must be UTF-8: convert it (e.g. `iconv -f latin1 -t utf-8`)"
                        f"{hint}") from err


def stdlib_files(max_bytes: int) -> tuple[Path, list[Path]]:
    """(root, sorted *.py files of the standard library outside test dirs, the first `max_bytes` bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise DataError(f"the Python standard library folder {root} (sysconfig stdlib path) does not exist; "
                        f"use data.dataset=text:PATH instead")
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).parts
        if any(part in _SKIPPED_STDLIB_DIRS for part in rel[:-1]) or not path.is_file():
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        files.append(path)
        total += size
        if total >= max_bytes:
            break
    return root, files


def text_files(root: Path) -> list[Path]:
    """`root` itself, or every non-hidden file under the folder `root`, sorted."""
    if root.is_file():
        return [root]
    if not root.exists():
        raise DataError(f"data.dataset=text:{root}: {root} does not exist; give a UTF-8 text file or a "
                        f"folder of them")
    return sorted(p for p in root.rglob("*") if p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(root).parts))


# --------------------------------------------------------------------------------------------------
# TFDS builders (array_record, no TensorFlow)
# --------------------------------------------------------------------------------------------------


# _LOCAL_BUILDER_NOTE: TFDS looks for download checksums beside a builder's source through
# `importlib_resources`, a package it does not install; our builders download nothing, so they declare no
# code path and TFDS skips the lookup.


def _text_features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict({"text": tfds.features.Text(), "source": tfds.features.Text()})


@dataclasses.dataclass(eq=False)
class PyStdlibConfig(tfds.core.BuilderConfig):
    max_bytes: int = 16 << 20


class PyStdlib(tfds.core.GeneratorBasedBuilder):
    """The Python standard library's source files, one document per file (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [PyStdlibConfig(name="default")]
    code_path = None  # see _LOCAL_BUILDER_NOTE

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(builder=self, features=_text_features(), description=(
            f"Python {sys.version_info.major}.{sys.version_info.minor} standard library *.py sources, "
            f"first {self.builder_config.max_bytes} bytes of sorted paths, test dirs skipped."))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        root, files = stdlib_files(self.builder_config.max_bytes)
        docs = []
        for path in files:
            try:
                docs.append((path.relative_to(root).as_posix(), path.read_bytes().decode("utf-8")))
            except UnicodeDecodeError:
                log.warning("skipping %s: not UTF-8", path)
        return _splits(self, docs, f"the standard library at {root}")

    def _generate_examples(self, docs: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for key, text in docs:
            yield key, {"text": text, "source": key}


@dataclasses.dataclass(eq=False)
class TextFilesConfig(tfds.core.BuilderConfig):
    path: str = ""
    doc_chars: int = 4096


class TextFiles(tfds.core.GeneratorBasedBuilder):
    """A local UTF-8 text file or folder cut into paragraph documents (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    BUILDER_CONFIGS = [TextFilesConfig(name="default")]
    code_path = None  # see _LOCAL_BUILDER_NOTE

    def _info(self) -> tfds.core.DatasetInfo:
        c = self.builder_config
        return tfds.core.DatasetInfo(builder=self, features=_text_features(), description=(
            f"Text of {c.path}, paragraph documents of at most {c.doc_chars} characters."))

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict:
        c = self.builder_config
        root = Path(c.path)
        docs = []
        for path in text_files(root):
            rel = path.name if path == root else path.relative_to(root).as_posix()
            text = read_utf8(path, hint=f" or remove it from {root}" if path != root else "")
            if not text:
                if path == root:
                    raise DataError(f"data.dataset=text:{root}: the file is empty; give a file with text")
                log.warning("skipping empty file %s", path)
                continue
            docs.extend((f"{rel}#{i}", doc) for i, doc in enumerate(split_documents(text, c.doc_chars)))
        return _splits(self, docs, str(root))

    def _generate_examples(self, docs: list[tuple[str, str]]) -> Iterator[tuple[str, dict]]:
        for key, text in docs:
            yield key, {"text": text, "source": key}


def _splits(builder: tfds.core.GeneratorBasedBuilder, docs: list[tuple[str, str]], where: str) -> dict:
    if len(docs) < 2:
        raise DataError(f"{where} holds {len(docs)} non-empty document(s); a dataset needs at least two "
                        f"(one for train, one for validation): add text, or blank-line separated paragraphs")
    mask = validation_mask([k for k, _ in docs])
    return {"train": builder._generate_examples([d for d, v in zip(docs, mask) if not v]),
            "validation": builder._generate_examples([d for d, v in zip(docs, mask) if v])}


def _prepare(builder: tfds.core.GeneratorBasedBuilder) -> tfds.core.GeneratorBasedBuilder:
    if not builder.is_prepared():
        log.info("building %s/%s in %s", builder.name, builder.builder_config.name, builder.data_dir)
        tfds.disable_progress_bar()
        builder.download_and_prepare()
    return builder


def pystdlib_builder(data_dir: str = "", max_mb: float = 16.0) -> PyStdlib:
    """The prepared default corpus (built on first use, in seconds)."""
    if max_mb <= 0:
        raise DataError(f"data.corpus_max_mb={max_mb} must be > 0")
    max_bytes = int(max_mb * (1 << 20))
    name = f"py{sys.version_info.major}{sys.version_info.minor}_max{max_bytes}"
    config = PyStdlibConfig(name=name, max_bytes=max_bytes)
    return _prepare(PyStdlib(config=config, data_dir=resolve_data_dir(data_dir), file_format="array_record"))


def text_builder(path: str, data_dir: str = "", doc_chars: int = 4096) -> TextFiles:
    """The prepared dataset of a local text file or folder (rebuilt when any file changes)."""
    if not path:
        raise DataError("data.dataset='text:' names no path; use text:PATH with a UTF-8 file or folder")
    root = Path(path).expanduser().resolve()
    files = text_files(root)
    if not files:
        raise DataError(f"data.dataset=text:{path}: the folder {root} holds no (non-hidden) files")
    fingerprint = hashlib.sha1(f"{root}|{doc_chars}".encode())
    for f in files:
        st = f.stat()
        fingerprint.update(f"|{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    stem = re.sub(r"[^A-Za-z0-9]+", "_", root.stem or "root").strip("_")[:40] or "root"
    config = TextFilesConfig(name=f"{stem}_{fingerprint.hexdigest()[:12]}", path=str(root),
                             doc_chars=doc_chars)
    return _prepare(TextFiles(config=config, data_dir=resolve_data_dir(data_dir), file_format="array_record"))


def catalog_builder(name: str, data_dir: str = "") -> tfds.core.DatasetBuilder:
    """A TFDS catalog dataset already prepared in array_record format under `data_dir` (never downloads)."""
    data_dir = resolve_data_dir(data_dir)
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as err:
        raise DataError(f"data.dataset='tfds:{name}': TFDS has no dataset named {name.split('/')[0]!r}; "
                        f"check the name in the TFDS catalog (e.g. tfds:tiny_shakespeare, tfds:lm1b, "
                        f"tfds:c4/en)") from err
    except ImportError as err:
        raise DataError(f"data.dataset='tfds:{name}': its TFDS builder needs a package that is not installed "
                        f"({err}); install it, or prepare the dataset elsewhere and copy it to {data_dir}") from err
    except (ValueError, KeyError, AssertionError) as err:
        raise DataError(f"data.dataset='tfds:{name}' cannot be opened: {err}") from err
    if not builder.is_prepared():
        raise DataError(
            f"data.dataset='tfds:{name}' is not prepared under data_dir {data_dir}; prepare it there in "
            f"array_record format (e.g. `tfds build {name} --data_dir={data_dir} --file_format=array_record`), "
            f"or point data.data_dir / ${DATA_DIR_ENV} at the folder that holds it")
    file_format = getattr(builder.info, "file_format", None)
    if file_format is not None and getattr(file_format, "value", file_format) != "array_record":
        raise DataError(
            f"data.dataset='tfds:{name}' under {data_dir} is stored as {getattr(file_format, 'value', file_format)}, "
            f"which needs TensorFlow to read; re-prepare it with --file_format=array_record")
    return builder


# --------------------------------------------------------------------------------------------------
# Random-access text sources
# --------------------------------------------------------------------------------------------------


class TextSource:
    """Documents of one split as `str`, random access: `len(src)`, `src[i]` (a Grain data source)."""

    def __init__(self, data_source: Sequence, text_key: str, description: str):
        self._source = data_source
        self._key = text_key
        self.description = description

    def __len__(self) -> int:
        return len(self._source)

    def _text(self, record: dict, index: int) -> str:
        value = record[self._key]
        if isinstance(value, str):
            return value
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"record {index} of {self.description} is not valid UTF-8: {err}") from err

    def __getitem__(self, index: int) -> str:
        return self._text(self._source[index], index)

    def __getitems__(self, indices: Sequence[int]) -> list[str]:
        records = (self._source.__getitems__(indices) if hasattr(self._source, "__getitems__")
                   else [self._source[i] for i in indices])
        return [self._text(r, i) for r, i in zip(records, indices)]

    def __repr__(self) -> str:
        return f"TextSource({self.description}, {len(self)} documents)"


def open_text_source(dataset: str, split: str, *, data_dir: str = "", text_key: str = "text",
                     corpus_max_mb: float = 16.0, doc_chars: int = 4096) -> TextSource:
    """The documents of `split` of `dataset` (pystdlib, text:PATH or tfds:NAME), building local datasets
    on first use. Raises DataError naming the dataset, file or split and what to do."""
    if dataset == "pystdlib":
        builder, key = pystdlib_builder(data_dir, corpus_max_mb), "text"
    elif dataset.startswith("text:"):
        builder, key = text_builder(dataset[len("text:"):], data_dir, doc_chars), "text"
    elif dataset.startswith("tfds:"):
        builder, key = catalog_builder(dataset[len("tfds:"):], data_dir), text_key
    else:
        raise DataError(f"data.dataset={dataset!r} is not allowed: use pystdlib, text:PATH or tfds:NAME")
    splits = sorted(builder.info.splits.keys())
    base_split = re.split(r"[\[+]", split, maxsplit=1)[0]
    if base_split not in splits:
        raise DataError(f"split {split!r} does not exist in data.dataset={dataset!r}; its splits are {splits}")
    features = builder.info.features
    if key not in features:
        raise DataError(f"data.text_key={key!r} is not a feature of data.dataset={dataset!r}; its features "
                        f"are {sorted(features.keys())}")
    source = builder.as_data_source(split=split)
    if len(source) == 0:
        raise DataError(f"split {split!r} of data.dataset={dataset!r} holds no documents")
    return TextSource(source, key, f"{dataset} split {split!r}")
