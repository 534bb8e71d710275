"""The Grain pipeline: packing invariants, the batch format, determinism, exact resume (get_state/set_state
and Orbax), per-process row slots (each process tokenizes only its rows), global arrays on a mesh, Engram
ids, and bad configs."""

from __future__ import annotations

import json
from pathlib import Path

import chex
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mhc_jax.config import Config, ConfigError, MeshConfig, load_config
from mhc_jax.errors import DataError
from mhc_jax.data.layout import batch_spec, synthetic_batch
from mhc_jax.data.packing import PackDocuments
from mhc_jax.data.pipeline import (load_tokenizer, make_eval_iterator, make_train_iterator, open_split,
                                   restore_args, save_args, tokenized)
from mhc_jax.data.tokenizer import train_sentencepiece
from mhc_jax.sharding import make_mesh

from conftest import stdlib_prose

B, T = 4, 32


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """~300 real-text documents of 10..100 characters: many shorter and many longer than a row."""
    path = tmp_path_factory.mktemp("corpus") / "prose_head.txt"
    path.write_text(stdlib_prose(20_000))
    return path


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("spm") / "ts.model"
    train_sentencepiece(stdlib_prose(300_000).split("\n\n"), 400, out)
    return str(out)


def make_cfg(corpus: Path, data_dir: Path, *overrides: str) -> Config:
    return load_config("configs/tiny.yaml", [f"data.dataset=text:{corpus}", f"data.data_dir={data_dir}",
                                             "data.doc_chars=100", f"data.seq_len={T}", f"data.batch_size={B}",
                                             *overrides])


def take(it, n: int) -> list[dict[str, np.ndarray]]:
    return [jax.tree.map(np.asarray, next(it)) for _ in range(n)]


def assert_batches_equal(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        chex.assert_trees_all_equal(x, y)


def check_row_invariants(batch: dict[str, np.ndarray], bos: int, pad: int) -> None:
    seg, pos, mask = batch["segment_ids"], batch["positions"], batch["loss_mask"]
    for key in ("inputs", "targets", "segment_ids", "positions"):
        chex.assert_shape(batch[key], (B, T))
        assert batch[key].dtype == np.int32
    assert batch["loss_mask"].dtype == np.float32
    np.testing.assert_array_equal(mask, (seg > 0).astype(np.float32))
    np.testing.assert_array_equal(batch["inputs"][seg == 0], pad)
    np.testing.assert_array_equal(batch["targets"][seg == 0], pad)
    for r in range(B):
        row = seg[r]
        n = int((row > 0).sum())
        assert (row[n:] == 0).all(), "padding only at the end of a row"
        starts = [t for t in range(n) if t == 0 or row[t] != row[t - 1]]
        assert list(row[starts]) == list(range(1, len(starts) + 1)), "documents numbered 1.. within a row"
        for k, s in enumerate(starts):
            e = starts[k + 1] if k + 1 < len(starts) else n
            np.testing.assert_array_equal(pos[r, s:e], np.arange(e - s))
            # Every document start inside a row carries BOS; only the first segment may be a continuation.
            if k > 0:
                assert batch["inputs"][r, s] == bos
        assert (batch["inputs"][r, :n] == bos).sum() == sum(batch["inputs"][r, s] == bos for s in starts)


@pytest.mark.parametrize("tokenizer", ["byte", "spm"])
def test_packing_keeps_every_token_once_in_order_with_in_document_targets(
        corpus: Path, tmp_path: Path, spm_model: str, tokenizer: str) -> None:
    name = "byte" if tokenizer == "byte" else spm_model
    # Documents of at most 40 characters: some longer than a row (split), some inside one row.
    cfg = make_cfg(corpus, tmp_path, f"data.tokenizer={name}", "model.vocab_size=400", "data.doc_chars=40")
    tok = load_tokenizer(name)
    source = open_split(cfg, "train")
    batches = list(make_eval_iterator(cfg.replace(data={"eval_split": "train"}), num_batches=10**6))
    for batch in batches:
        check_row_invariants(batch, tok.bos_id, tok.pad_id)
    docs = [tok.encode(source[i]) for i in range(len(source))]
    # Row slot r packs documents r, r + B, r + 2B, ... in order, one row per batch.
    for r in range(B):
        valid = np.concatenate([b["segment_ids"][r] > 0 for b in batches])
        inputs = np.concatenate([b["inputs"][r] for b in batches])[valid]
        targets = np.concatenate([b["targets"][r] for b in batches])[valid]
        np.testing.assert_array_equal(inputs, np.concatenate([[tok.bos_id, *d] for d in docs[r::B]]))
        np.testing.assert_array_equal(targets, np.concatenate([[*d, tok.eos_id] for d in docs[r::B]]))
        assert tok.decode(inputs) == "".join(source[i] for i in range(r, len(source), B))
    assert batches[-1]["loss_mask"].any(), "the iterator stops after the last batch holding a token"
    if tokenizer == "byte":
        assert sum(len(d) + 1 > T for d in docs) > 10 and sum(len(d) + 1 < T // 2 for d in docs) > 10


def test_one_training_epoch_is_a_shuffled_permutation_of_the_documents(corpus: Path, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path)
    tok = load_tokenizer("byte")
    source = open_split(cfg, "train")
    docs = [source[i] for i in range(len(source))]
    n_batches = 2 * (sum(len(d.encode()) + 1 for d in docs) // (B * T)) + 4
    batches = take(make_train_iterator(cfg), n_batches)
    seen = []
    for r in range(B):  # slot r holds positions r, r + B, ... of the epoch's document order
        stream = np.concatenate([b["inputs"][r] for b in batches])
        assert (stream != tok.pad_id).all(), "training rows are always full"
        starts = np.flatnonzero(stream == tok.bos_id)
        n = len(range(r, len(docs), B))
        seen += [tok.decode(stream[s + 1:e]) for s, e in zip(starts[:n], starts[1:n + 1])]
    assert sorted(seen) == sorted(docs)
    assert seen != [d for r in range(B) for d in docs[r::B]]


def test_same_seed_gives_the_same_batches_and_another_seed_differs(corpus: Path, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path)
    assert_batches_equal(take(make_train_iterator(cfg), 6), take(make_train_iterator(cfg), 6))
    other = take(make_train_iterator(cfg.replace(data={"shuffle_seed": 1})), 6)
    assert any((a["inputs"] != b["inputs"]).any() for a, b in zip(other, take(make_train_iterator(cfg), 6)))


@pytest.mark.parametrize("skip", [0, 1, 7, 23])
def test_resume_from_json_state_continues_exactly(corpus: Path, tmp_path: Path, skip: int) -> None:
    cfg = make_cfg(corpus, tmp_path)
    it = make_train_iterator(cfg)
    take(it, skip)
    state = json.loads(json.dumps(it.get_state()))
    expected = take(it, 8)
    resumed = make_train_iterator(cfg)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 8), expected)


def test_packer_state_without_a_pending_document_survives_json() -> None:
    # Rows that end exactly at a document end leave no remainder: Grain marks that with tuples (-1, -1),
    # which JSON turns into lists; a restored iterator must not mistake them for a pending document.
    lengths = [8, 8, 5, 3, 8, 6, 2, 8, 4, 4]
    docs = [{"inputs": np.arange(n, dtype=np.int32) + 100 * i, "targets": np.arange(n, dtype=np.int32) + 100 * i + 1}
            for i, n in enumerate(lengths)]
    packed = PackDocuments(grain.MapDataset.source(docs).to_iter_dataset(), seq_len=8)
    rows = list(packed)
    assert len(rows) == 7
    for k in range(len(rows)):
        it = iter(packed)
        for _ in range(k):
            next(it)
        restored = iter(packed)
        restored.set_state(json.loads(json.dumps(it.get_state())))
        chex.assert_trees_all_equal(list(restored), rows[k:])


def test_resume_from_an_orbax_checkpoint_continues_exactly(corpus: Path, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path / "tfds")
    it = make_train_iterator(cfg)
    take(it, 5)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.save(5, args=ocp.args.Composite(data=save_args(it)))
        mngr.wait_until_finished()
    expected = take(it, 6)
    resumed = make_train_iterator(cfg)
    with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
        mngr.restore(5, args=ocp.args.Composite(data=restore_args(resumed)))
    assert_batches_equal(take(resumed, 6), expected)


@pytest.mark.parametrize("process_count", [2, 4])
def test_each_process_tokenizes_only_its_rows_and_the_rows_cover_the_global_batch(corpus: Path, tmp_path: Path,
                                                                                   process_count: int) -> None:
    cfg = make_cfg(corpus, tmp_path, "engram.enabled=true", "engram.layers=[1]", "data.prefetch=0")

    def run(p: int, n: int) -> tuple[list[dict], dict[str, int]]:
        before = tokenized()
        batches = take(make_train_iterator(cfg, process_index=p, process_count=n), 3)
        return batches, {k: v - before[k] for k, v in tokenized().items()}

    whole, whole_work = run(0, 1)
    parts, work = zip(*(run(p, process_count) for p in range(process_count)))
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            chex.assert_shape(parts[0][step][key], (B // process_count, *value.shape[1:]))
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), value)
    # No process does the work of the whole batch: the processes' documents and tokens add up to it.
    for key in ("documents", "tokens"):
        assert sum(w[key] for w in work) == whole_work[key] > 0
        assert all(0 < w[key] < whole_work[key] for w in work), (work, whole_work)


def test_eval_batches_are_the_same_on_any_process_count_and_empty_after_the_split(corpus: Path,
                                                                                   tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path, "data.prefetch=0")
    whole = list(make_eval_iterator(cfg, num_batches=10**6))
    limit = len(whole) + 3
    parts = [list(make_eval_iterator(cfg, process_index=p, process_count=2, num_batches=limit)) for p in range(2)]
    # Across processes no process knows when the others' slots run out: every one yields `limit` batches,
    # the ones after the split empty (evaluate_model stops at the first with no token).
    assert [len(p) for p in parts] == [limit, limit]
    for step, batch in enumerate(whole):
        for key, value in batch.items():
            np.testing.assert_array_equal(np.concatenate([p[step][key] for p in parts]), value)
    for p in parts:
        assert not any(b["loss_mask"].any() for b in p[len(whole):])


def test_resume_with_another_process_count_fails_naming_the_slots(corpus: Path, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path)
    state = make_train_iterator(cfg, process_index=0, process_count=2).get_state()
    with pytest.raises(DataError, match="2 row slots, this process runs 4"):
        make_train_iterator(cfg).set_state(state)


def test_batches_become_global_arrays_split_over_the_mesh_batch_axes(corpus: Path, tmp_path: Path) -> None:
    mesh = make_mesh(MeshConfig(data=4, fsdp=2))
    cfg = make_cfg(corpus, tmp_path, "data.batch_size=8")
    batch = next(make_train_iterator(cfg, mesh=mesh))
    reference = take(make_train_iterator(cfg), 1)[0]
    for key, value in batch.items():
        assert isinstance(value, jax.Array) and value.shape == (8, T)
        assert value.sharding.spec[0] == ("data", "fsdp")
        assert len(value.addressable_shards) == 8 and value.addressable_shards[0].data.shape == (1, T)
        np.testing.assert_array_equal(np.asarray(value), reference[key])
    with pytest.raises(ValueError, match="data.batch_size"):
        make_train_iterator(make_cfg(corpus, tmp_path, "data.batch_size=4"), mesh=mesh)


def test_engram_ids_never_mix_documents(corpus: Path, tmp_path: Path) -> None:
    from mhc_jax.engram.ids import EngramIds

    cfg = make_cfg(corpus, tmp_path, "engram.enabled=true", "engram.layers=[0, 1]", "engram.max_ngram=3")
    hasher = EngramIds(cfg.engram, load_tokenizer("byte"))
    batch = take(make_train_iterator(cfg), 1)[0]
    chex.assert_shape(batch["engram_ids"], (B, T, 2, hasher.ids_per_position))
    assert batch["engram_ids"].dtype == np.int32
    # Hashing each document piece as a row of its own gives the same ids as the packed row.
    for r in range(B):
        for s in np.unique(batch["segment_ids"][r]):
            cols = batch["segment_ids"][r] == s
            alone = hasher(batch["inputs"][r:r + 1, cols])
            np.testing.assert_array_equal(batch["engram_ids"][r, cols], alone[0])


def assert_matches_spec(batch: dict, spec: dict) -> None:
    assert set(batch) == set(spec)
    for key, s in spec.items():
        assert (np.shape(batch[key]), np.asarray(batch[key]).dtype) == (s.shape, s.dtype), key


@pytest.mark.parametrize("engram", [False, True])
def test_pipeline_and_synthetic_batches_have_the_one_batch_layout(corpus: Path, tmp_path: Path, engram: bool) -> None:
    cfg = make_cfg(corpus, tmp_path, f"engram.enabled={str(engram).lower()}", "engram.layers=[0, 1]")
    spec = batch_spec(cfg)
    assert_matches_spec(take(make_train_iterator(cfg), 1)[0], spec)
    assert_matches_spec(synthetic_batch(cfg), spec)
    if engram:  # (B, T, Engram layers, (max_ngram - 1) * heads_per_ngram)
        assert spec["engram_ids"].shape == (B, T, 2, (cfg.engram.max_ngram - 1) * cfg.engram.heads_per_ngram)


def test_synthetic_batch_packs_documents_like_the_pipeline_and_takes_real_engram_ids(corpus: Path,
                                                                                   tmp_path: Path) -> None:
    from mhc_jax.engram.ids import EngramIds

    cfg = make_cfg(corpus, tmp_path, "engram.enabled=true", "engram.layers=[1]")
    tokens = np.asarray(load_tokenizer("byte").encode(corpus.read_text()), np.int32)
    hasher = EngramIds(cfg.engram, load_tokenizer("byte"))
    batch = synthetic_batch(cfg, tokens=tokens, documents=3, masked=0.25, engram_ids=hasher)
    np.testing.assert_array_equal(batch["inputs"][0], tokens[:T])
    np.testing.assert_array_equal(batch["targets"][0], tokens[1:T + 1])
    seg_T, pos_T = batch["segment_ids"][0], batch["positions"][0]
    starts = np.flatnonzero(np.diff(seg_T, prepend=0))  # documents numbered 1.., positions restart at 0
    assert list(seg_T[starts]) == [1, 2, 3] and (pos_T[starts] == 0).all()
    np.testing.assert_array_equal(np.diff(pos_T)[np.diff(seg_T) == 0], 1)
    assert 0.05 < 1 - batch["loss_mask"].mean() < 0.5
    np.testing.assert_array_equal(batch["engram_ids"], hasher(batch["inputs"], batch["segment_ids"]))
    random_ids = synthetic_batch(cfg)["engram_ids"]
    assert (random_ids >= 0).all() and (random_ids < 2**31 - 1).all() and len(np.unique(random_ids)) > 100
    with pytest.raises(ValueError, match="at least"):
        synthetic_batch(cfg, tokens=tokens[:10])


def test_eval_data_restarts_from_its_first_batch_and_masks_the_padded_tail(corpus: Path, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path, "training.eval_batches=3")
    evaluation = make_eval_iterator(cfg)
    first, second = list(evaluation), list(evaluation)
    assert len(first) == 3
    assert_batches_equal(first, second)
    assert_batches_equal(first, list(make_eval_iterator(cfg.replace(data={"shuffle_seed": 5}))))
    everything = list(make_eval_iterator(cfg, num_batches=10**6))
    last = everything[-1]
    assert (last["loss_mask"] == 0).any() and (last["inputs"][last["loss_mask"] == 0] == 258).all()


def test_worker_processes_give_the_same_batches_each_run_and_resume(corpus: Path, tmp_path: Path) -> None:
    cfg = make_cfg(corpus, tmp_path, "data.worker_count=1")
    it = make_train_iterator(cfg)
    take(it, 2)
    state = it.get_state()
    expected = take(it, 3)
    resumed = make_train_iterator(cfg)
    resumed.set_state(json.loads(json.dumps(state)))
    assert_batches_equal(take(resumed, 3), expected)


def test_model_vocab_smaller_than_the_tokenizer_is_rejected(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model.vocab_size=100.*259"):
        make_train_iterator(make_cfg(corpus, tmp_path, "model.vocab_size=100"))


def test_missing_tokenizer_file_in_config_is_an_error_naming_it(corpus: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.model"):
        make_train_iterator(make_cfg(corpus, tmp_path, f"data.tokenizer={tmp_path / 'missing.model'}"))
