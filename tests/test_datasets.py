"""Text datasets: the embedded stdlib corpus, local text files and folders, TFDS catalog names, the
validation split rule, data_dir resolution, and a clear error for every kind of bad input."""

from __future__ import annotations

import hashlib
import os
import sysconfig
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mhc_jax.data.corpus import (DEFAULT_DATA_DIR, DataError, open_text_source, pystdlib_builder,
                                 resolve_data_dir, split_documents, text_builder, validation_mask)



def records(builder, split: str) -> list[tuple[str, str]]:
    src = builder.as_data_source(split=split)
    return [(r["source"].decode(), r["text"].decode()) for r in (src[i] for i in range(len(src)))]


def chunk_index(source: str) -> tuple[str, int]:
    name, index = source.rsplit("#", 1)
    return name, int(index)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet="ab \n\t", max_size=300), st.integers(1, 40))
def test_documents_concatenate_back_to_the_text_and_respect_the_size(text: str, doc_chars: int) -> None:
    docs = split_documents(text, doc_chars)
    assert "".join(docs) == text
    assert all(0 < len(d) <= doc_chars for d in docs)


def test_documents_end_at_paragraph_boundaries() -> None:
    paragraphs = [f"para {i}\nline two\n\n" for i in range(10)]  # 20 chars each
    docs = split_documents("".join(paragraphs), doc_chars=45)
    assert docs == ["".join(paragraphs[i:i + 2]) for i in range(0, 10, 2)]


def test_validation_split_is_sha1_mod_100_below_2_and_never_empty() -> None:
    keys = [f"doc{i}.py" for i in range(1000)]
    expected = [int(hashlib.sha1(k.encode()).hexdigest()[:16], 16) % 100 < 2 for k in keys]
    assert validation_mask(keys) == expected
    assert 5 <= sum(expected) <= 40
    few = [k for k, v in zip(keys, expected) if not v][:5]
    mask = validation_mask(few)
    smallest = min(few, key=lambda k: int(hashlib.sha1(k.encode()).hexdigest()[:16], 16))
    assert mask == [k == smallest for k in few]


def test_default_corpus_is_the_stdlib_sources_and_builds_fast(tmp_path: Path) -> None:
    start = time.perf_counter()
    builder = pystdlib_builder(str(tmp_path))
    assert time.perf_counter() - start < 30
    root = Path(sysconfig.get_paths()["stdlib"])
    train, val = records(builder, "train"), records(builder, "validation")
    assert val and len(val) < 0.1 * len(train)
    assert not {s for s, _ in train} & {s for s, _ in val}
    for source, text in train + val:
        assert not {"test", "tests", "idle_test", "site-packages"} & set(Path(source).parts[:-1])
        assert text == (root / source).read_text(encoding="utf-8")
    assert {s for s, _ in train + val} >= {"os.py", "json/__init__.py", "collections/__init__.py"}


def test_default_corpus_cap_keeps_the_first_files_in_sorted_order(tmp_path: Path) -> None:
    builder = pystdlib_builder(str(tmp_path), max_mb=0.2)
    sources = sorted(s for split in ("train", "validation") for s, _ in records(builder, split))
    sizes = [(sysconfig.get_paths()["stdlib"] / Path(s)).stat().st_size for s in sources]
    assert sum(sizes) >= 0.2 * 2**20 and sum(sizes[:-1]) < 0.2 * 2**20
    assert len(records(builder, "validation")) >= 1


def check_documents_cover_the_file_exactly(path: Path, data_dir: Path) -> None:
    builder = text_builder(str(path), str(data_dir), doc_chars=4096)
    train, val = records(builder, "train"), records(builder, "validation")
    assert 1 <= len(val) < 0.1 * len(train)
    ordered = sorted(train + val, key=lambda r: chunk_index(r[0]))
    assert [chunk_index(s)[1] for s, _ in ordered] == list(range(len(ordered)))
    assert "".join(t for _, t in ordered) == path.read_text()
    assert all(len(t) <= 4096 for _, t in ordered)


def test_single_file_documents_cover_the_file_exactly(tmp_path: Path, prose_path: str) -> None:
    check_documents_cover_the_file_exactly(Path(prose_path), tmp_path)


def test_tinyshakespeare_documents_cover_the_file_exactly(tmp_path: Path, shakespeare_path: str) -> None:
    check_documents_cover_the_file_exactly(Path(shakespeare_path), tmp_path)


def test_text_folder_reads_every_visible_file(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    (folder / "sub").mkdir(parents=True)
    files = {"a.txt": "alpha one\n\nalpha two\n", "sub/b.md": "béta\n\ngamma 日本\n\ndelta\n"}
    for name, text in files.items():
        (folder / name).write_text(text)
    (folder / ".hidden").write_text("never read")
    builder = text_builder(str(folder), str(tmp_path / "tfds"), doc_chars=12)
    rows = records(builder, "train") + records(builder, "validation")
    by_file: dict[str, list[tuple[int, str]]] = {}
    for source, text in rows:
        name, i = chunk_index(source)
        by_file.setdefault(name, []).append((i, text))
    assert {n: "".join(t for _, t in sorted(c)) for n, c in by_file.items()} == files


def test_text_dataset_is_rebuilt_when_the_file_changes(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"

    def documents() -> set[str]:
        sources = [open_text_source(f"text:{path}", split, data_dir=str(tmp_path / "tfds"), doc_chars=20)
                   for split in ("train", "validation")]
        return {s[i] for s in sources for i in range(len(s))}

    path.write_text("first version\n\nsecond paragraph\n")
    assert documents() == {"first version\n\n", "second paragraph\n"}
    path.write_text("edited text here\n\nand another one\n")
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert documents() == {"edited text here\n\n", "and another one\n"}


def test_tfds_name_reads_a_prepared_dataset_from_data_dir(tmp_path: Path, prose_path: str) -> None:
    builder = text_builder(prose_path, str(tmp_path))
    name = f"tfds:text_files/{builder.builder_config.name}"
    via_tfds = open_text_source(name, "validation", data_dir=str(tmp_path))
    via_text = open_text_source(f"text:{prose_path}", "validation", data_dir=str(tmp_path))
    assert [via_tfds[i] for i in range(len(via_tfds))] == [via_text[i] for i in range(len(via_text))]


def test_data_dir_is_config_then_env_then_home_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MHC_JAX_DATA_DIR", raising=False)
    assert resolve_data_dir("") == os.path.expanduser(DEFAULT_DATA_DIR)
    monkeypatch.setenv("MHC_JAX_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir("") == str(tmp_path / "env")
    assert resolve_data_dir(str(tmp_path / "cfg")) == str(tmp_path / "cfg")


# ---------------------------------------------------------------------------------------------------
# Bad input: each a DataError naming the file or dataset and what to do
# ---------------------------------------------------------------------------------------------------


def test_empty_file_is_an_error_naming_it(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("")
    with pytest.raises(DataError, match=r"empty\.txt.*empty"):
        open_text_source(f"text:{path}", "train", data_dir=str(tmp_path / "tfds"))


def test_invalid_utf8_is_an_error_naming_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "good.txt").write_text("fine\n\ntext\n")
    (folder / "latin1.txt").write_bytes("caf\xe9\n\nna\xefve\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.txt is not valid UTF-8.*iconv"):
        open_text_source(f"text:{folder}", "train", data_dir=str(tmp_path / "tfds"))


def test_missing_path_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nowhere\.txt does not exist"):
        open_text_source(f"text:{tmp_path / 'nowhere.txt'}", "train", data_dir=str(tmp_path))


def test_single_paragraph_file_is_too_small_for_two_splits(tmp_path: Path) -> None:
    path = tmp_path / "one.txt"
    path.write_text("just one short line")
    with pytest.raises(DataError, match=r"one\.txt holds 1 non-empty document.*at least two"):
        open_text_source(f"text:{path}", "train", data_dir=str(tmp_path / "tfds"))


def test_unknown_tfds_dataset_is_an_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no_such_dataset_xyz"):
        open_text_source("tfds:no_such_dataset_xyz", "train", data_dir=str(tmp_path))


def test_unprepared_tfds_dataset_names_the_data_dir_and_how_to_prepare(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=rf"tiny_shakespeare' is not prepared under data_dir {tmp_path}.*tfds build"):
        open_text_source("tfds:tiny_shakespeare", "train", data_dir=str(tmp_path))


def test_unknown_split_and_text_key_are_errors_listing_the_choices(tmp_path: Path, prose_path: str) -> None:
    with pytest.raises(DataError, match=r"split 'test' does not exist.*\['train', 'validation'\]"):
        open_text_source(f"text:{prose_path}", "test", data_dir=str(tmp_path))
    name = f"tfds:text_files/{text_builder(prose_path, str(tmp_path)).builder_config.name}"
    with pytest.raises(DataError, match=r"data.text_key='content'.*\['source', 'text'\]"):
        open_text_source(name, "train", data_dir=str(tmp_path), text_key="content")


def test_unknown_dataset_kind_is_an_error_listing_the_kinds(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="pystdlib, text:PATH or tfds:NAME"):
        open_text_source("wikipedia", "train", data_dir=str(tmp_path))
