"""Orbax checkpoints of the whole run: train state (model + optimiser), data-iterator state and metadata
(step, resolved config, RNG seed, integrity checksums) in one step directory.

Orbax writes each step into a temporary directory and renames it when complete, so a partially written
checkpoint is never listed. Every checkpoint also carries a checksum of every array (computed on the
devices, see `tree_checksums`; the sparse Engram host tables' on the host, `host_tree_checksums`) and of its
data-iterator state; restore recomputes and compares them, so
flipped bytes are caught, not trained on. A checkpoint that is listed but unreadable or fails its checksums
is skipped in favour of the previous one with one warning; with `heal=True` (the trainer) it is first moved
aside to `<directory>_unreadable/<step>-<UTC time>` (renamed, never deleted), so the run can save that step
again. A full disk ends as a `CheckpointError` naming the path, the space a checkpoint needs and the space
free; the previous checkpoints stay, and the half-written step is removed by Orbax when the run resumes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from mhc_jax.config import CheckpointConfig
from mhc_jax.errors import CheckpointError, MhcJaxError, disk_full
from mhc_jax.train.step import to_device_memory

log = logging.getLogger(__name__)

HOST_ITEM = "engram_tables"  # sparse Engram tables + row moments (numpy, host RAM), see mhc_jax.engram.host_tables

UNREADABLE_SUFFIX = "_unreadable"  # damaged steps are moved to <checkpoints>_unreadable/<step>-<time>


# --------------------------------------------------------------------------------------------------
# Integrity: a position-weighted sum of every array's 32-bit words, on the devices
# --------------------------------------------------------------------------------------------------


def _words(x: jax.Array) -> jax.Array:
    """The array's bits as uint32 words (16-/8-bit types widened, 64-bit types as two words)."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    bits = x.dtype.itemsize * 8
    if bits < 32:
        return jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{bits}")).astype(jnp.uint32)
    return jax.lax.bitcast_convert_type(x, jnp.uint32)


def _array_checksum(x: jax.Array) -> jax.Array:
    """Two uint32 sums over the words u_i at flat index i: sum u_i (2i + 1) and sum mix(u_i) w_i with odd
    weights. uint32 addition wraps and is associative, so the result is exact and the same for any
    sharding or mesh (it is a plain sharded reduction: no gather, no host copy of the array). Any change
    of one word changes the first sum (an odd weight is invertible mod 2^32)."""
    u = _words(x)
    idx = jnp.zeros(u.shape, jnp.uint32)
    stride = 1
    for d in reversed(range(u.ndim)):
        idx = idx + jax.lax.broadcasted_iota(jnp.uint32, u.shape, d) * jnp.uint32(stride % (1 << 32))
        stride *= u.shape[d]
    s1 = jnp.sum(u * (2 * idx + 1), dtype=jnp.uint32)
    mixed = (u ^ (u >> 16)) * jnp.uint32(0x45D9F3B)
    s2 = jnp.sum(mixed * ((idx * jnp.uint32(0x9E3779B1)) | 1), dtype=jnp.uint32)
    return jnp.stack([s1, s2])


_tree_sums = jax.jit(lambda tree: jax.tree.map(_array_checksum, tree))


def tree_checksums(tree: Any) -> dict[str, str]:
    """{array path: 16 hex digits} for every array of `tree` (one jitted reduction, 8 bytes per array
    copied to the host)."""
    sums = jax.device_get(_tree_sums(to_device_memory(tree)))  # host-resident Engram tables: on the device
    return {jax.tree_util.keystr(path): "%08x%08x" % tuple(int(v) for v in s)
            for path, s in jax.tree_util.tree_flatten_with_path(sums)[0]}


_HOST_CHUNK = 1 << 22  # words per numpy pass: a 2.5 GB table is checksummed with ~50 MB of temporaries


def _host_words(x: np.ndarray) -> np.ndarray:
    """`_words` in numpy, flattened: 64-bit types as two words each in memory order (as the bitcast)."""
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return x.reshape(-1).astype(np.uint32)
    if x.dtype.itemsize < 4:
        return x.reshape(-1).view(np.dtype(f"uint{8 * x.dtype.itemsize}")).astype(np.uint32)
    return x.reshape(-1).view(np.uint32)


def _host_array_checksum(x: np.ndarray, first: int = 0) -> tuple[int, int]:
    """`_array_checksum` of a host (numpy) array, on the host CPU in chunks: uint32 arithmetic wraps in
    numpy as in XLA, so the two sums are the same numbers. `first`: the flat word index of x's first word
    in a larger array (the sums of the parts of an array add up to the array's, mod 2**32)."""
    u = _host_words(x)
    s1 = s2 = np.uint32(0)
    with np.errstate(over="ignore"):
        for start in range(0, u.size, _HOST_CHUNK):
            w = u[start:start + _HOST_CHUNK]
            idx = np.arange(first + start, first + start + w.size, dtype=np.uint64).astype(np.uint32)  # as the iota
            s1 = s1 + np.sum(w * (np.uint32(2) * idx + np.uint32(1)), dtype=np.uint32)
            mixed = (w ^ (w >> np.uint32(16))) * np.uint32(0x45D9F3B)
            s2 = s2 + np.sum(mixed * ((idx * np.uint32(0x9E3779B1)) | np.uint32(1)), dtype=np.uint32)
    return int(s1), int(s2)


def _row_shard_checksum(x: jax.Array) -> tuple[int, int]:
    """This process's part of `_host_array_checksum` of a global array split by rows over processes (the
    sparse Engram tables of several processes: one shard each)."""
    shard = x.addressable_shards[0]
    first = (shard.index[0].start or 0) * int(np.prod(x.shape[1:]))
    return _host_array_checksum(np.asarray(shard.data), first) if shard.replica_id == 0 else (0, 0)


def host_tree_checksums(tree: Any) -> dict[str, str]:
    """`tree_checksums` of a numpy tree kept in host RAM (sparse Engram tables and row moments), computed
    on the host without copying the tables to a device. Global arrays split by rows over processes
    (several processes' tables) are summed over the processes (a collective: every process calls it)."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    split = [isinstance(x, jax.Array) and not x.is_fully_addressable for _, x in leaves]
    sums = np.asarray([_row_shard_checksum(x) if s else _host_array_checksum(np.asarray(x))
                       for (_, x), s in zip(leaves, split)], np.uint32).reshape(len(leaves), 2)
    if any(split):
        from jax.experimental import multihost_utils
        every = np.asarray(multihost_utils.process_allgather(sums)).astype(np.uint64)  # (P, leaves, 2)
        sums = np.where(np.asarray(split)[:, None], every.sum(0) % (1 << 32), sums)
    return {jax.tree_util.keystr(path): "%08x%08x" % tuple(int(v) for v in s) for (path, _), s in zip(leaves, sums)}


def _json_digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _state_bytes(tree: Any) -> int:
    return int(sum(np.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree)))


class _Damaged(Exception):
    """A checkpoint whose bytes do not match its checksums."""


# --------------------------------------------------------------------------------------------------
# The checkpointer
# --------------------------------------------------------------------------------------------------


def _all_processes(data_state: dict) -> dict:
    """Every process's data-iterator state (each reads its own rows of the batch, so they differ), gathered
    in process order: the JSON item is written once, by the primary process. One process: unchanged."""
    if jax.process_count() == 1:
        return data_state
    from jax.experimental import multihost_utils

    raw = np.frombuffer(json.dumps(data_state, sort_keys=True).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:raw.size] = raw
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return {"process_states": [json.loads(bytes(rows[i, :n])) for i, n in enumerate(sizes)]}


def _this_process(data: dict | None) -> dict | None:
    """This process's entry of a state saved by `_all_processes` (a state of another process count is
    returned whole: the iterator refuses it and the caller says the data order restarts)."""
    if isinstance(data, dict) and "process_states" in data and len(data["process_states"]) == jax.process_count():
        return data["process_states"][jax.process_index()]
    return data


class Checkpointer:
    """`save(step, state, data_state, meta)` / `restore(abstract_state) -> (state, data_state, meta, step)`.

    `state` is a pytree of arrays (e.g. `nnx.to_pure_dict(nnx.state((model, optimizer)))`); `abstract_state`
    the same tree of `jax.ShapeDtypeStruct(shape, dtype, sharding=...)`, which decides the mesh the arrays
    are restored onto (it may differ from the mesh they were saved from). `heal=True` moves unreadable steps
    aside (the trainer); readers (evaluate, generate) leave the directory as it is. After `restore`,
    `skipped` lists the steps it fell back over: {"step", "reason", "moved_to"}."""

    def __init__(self, directory: str, cfg: CheckpointConfig, *, heal: bool = False, read_only: bool = False):
        self.directory = os.path.abspath(directory) if "://" not in directory else directory
        self.heal = heal
        self.skipped: list[dict[str, Any]] = []
        self._bytes = 0  # size of the last saved state (for the full-disk message)
        self._in_flight: int | None = None  # step of an async save not yet known to be committed
        self.host_state: Any = None  # the verified host item of the last `restore(..., host_target=...)`
        options = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep, create=not read_only, read_only=read_only,
                                               enable_async_checkpointing=cfg.async_save,
                                               cleanup_tmp_directories=not read_only)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def all_steps(self) -> list[int]:
        self.manager.reload()
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        steps = self.all_steps()
        return steps[-1] if steps else None

    # -- saving ------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, data_state: dict | None = None, meta: dict | None = None,
             force: bool = False, host_state: Any = None) -> bool:
        """`host_state`: a numpy tree kept in host RAM (sparse Engram tables and moments), item HOST_ITEM."""
        meta = dict(meta or {}, checksums=tree_checksums(state))
        if host_state is not None:
            meta["host_checksums"] = host_tree_checksums(host_state)
        if data_state is not None:
            data_state = _all_processes(data_state)
            meta["data_digest"] = _json_digest(data_state)
        meta["meta_digest"] = _json_digest(meta)
        items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(meta)}
        if data_state is not None:
            items["data"] = ocp.args.JsonSave(data_state)
        if host_state is not None:
            items[HOST_ITEM] = ocp.args.StandardSave(host_state)
        self._bytes = _state_bytes(state)
        self.wait()  # a failed previous async save is reported as its own step
        self._clear_unlisted(step)
        with self._disk_errors(step):
            saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        self._in_flight = step if saved else None
        return saved

    def _clear_unlisted(self, step: int) -> None:
        """A directory of `step` that Orbax does not list (an unfinished or damaged write) would block
        saving it again: move it aside."""
        if "://" in self.directory or not os.path.isdir(os.path.join(self.directory, str(step))):
            return
        if step not in self.all_steps():
            self._move_aside(step, "its directory exists but is not a complete checkpoint")

    def wait(self) -> None:
        with self._disk_errors(self._in_flight):
            self.manager.wait_until_finished()
        self._in_flight = None

    def close(self) -> None:
        try:
            with self._disk_errors(self._in_flight):
                self.manager.wait_until_finished()
        finally:
            self._in_flight = None
            # Always stop Orbax's background threads, also after a failed save: left running, one of them
            # later posts to its closed event loop and prints a traceback at exit under the one-line error.
            try:
                self.manager.close()
            except Exception:  # the failed save already raised (or is raising) its own clear error
                pass

    def _disk_errors(self, step: int | None):
        return _DiskErrors(self, step)

    def _disk_full_error(self, step: int | None, err: BaseException) -> CheckpointError:
        free = shutil.disk_usage(self.directory).free if os.path.isdir(self.directory) else 0
        # The half-written step stays until Orbax removes it when the run starts again
        # (cleanup_tmp_directories): Orbax's other writer threads may still be writing into it now, and
        # removing it under them made each print a FileNotFoundError traceback under the one error line.
        last = self.latest_step()
        # What one checkpoint takes on this disk: the last good one's size, else the arrays' bytes.
        needed = _du(os.path.join(self.directory, str(last))) if last is not None else self._bytes
        what = f"checkpoint step {step}" if step is not None else "a checkpoint"
        kept = f"the last good checkpoint (step {last}) is kept" if last is not None else "no checkpoint was kept"
        return CheckpointError(
            f"no space left on device writing {what} to {self.directory}: a checkpoint of this run takes about "
            f"{needed / 2**20:,.1f} MiB (plus as much again while it is written) and the disk had "
            f"{free / 2**20:,.1f} MiB free; free space there (or use another --workdir) and re-run the same "
            f"command: {kept}")

    # -- restoring ---------------------------------------------------------------------------------

    def read_meta(self, step: int) -> dict:
        """The metadata of `step` (config, checksums), verified against its own digest."""
        meta = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
        if not isinstance(meta, dict):
            raise _Damaged(f"its metadata is not a mapping ({type(meta).__name__})")
        digest = meta.get("meta_digest")
        if digest is not None and digest != _json_digest({k: v for k, v in meta.items() if k != "meta_digest"}):
            raise _Damaged("its metadata does not match its digest")
        return meta

    def restore(self, abstract_state: Any, step: int | None = None,
                check_meta: Callable[[dict], None] | None = None,
                host_target: Any = None) -> tuple[Any, dict | None, dict, int]:
        """Restores `step`, or the newest readable step (unreadable newer ones are skipped, and moved
        aside with heal=True). `check_meta(meta)` runs before any array is read and may raise (e.g. a
        ConfigError when the run's model differs); such errors are not damage and propagate.
        `host_target`: the host item's numpy tree (sparse Engram tables), restored and verified with the
        step (a damaged one makes the step unreadable like damaged state) into `self.host_state`."""
        self.skipped = []
        self.host_state = None
        steps = self.all_steps()
        if step is not None:
            if step not in steps:
                raise CheckpointError(f"checkpoint step {step} does not exist in {self.directory}; "
                                      f"it holds steps {steps or 'none'}")
            try:
                return self._restore_step(abstract_state, step, check_meta, host_target)
            except MhcJaxError:
                raise
            except Exception as err:  # noqa: BLE001 - any failure to read it is reported as unreadable
                raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: "
                                      f"{_reason(err)}") from err
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        for s in reversed(steps):
            try:
                return self._restore_step(abstract_state, s, check_meta, host_target)
            except MhcJaxError:
                raise
            except Exception as err:  # noqa: BLE001 - any unreadable checkpoint falls back to the previous
                reason = _reason(err)
                moved = self._move_aside(s, reason) if self.heal else None
                self.skipped.append({"step": s, "reason": reason, "moved_to": moved})
                log.warning("checkpoint step %d in %s is unreadable (%s)%s; falling back to the previous one",
                            s, self.directory, reason, f"; moved it to {moved}" if moved else "")
        where = (f"; they were moved to {self.directory}{UNREADABLE_SUFFIX} (re-run to start from step 0)"
                 if self.heal else "")
        raise CheckpointError(f"no readable checkpoint in {self.directory}{where}: "
                              + "; ".join(f"step {d['step']}: {d['reason']}" for d in self.skipped))

    def restore_host_state(self, target: Any, step: int) -> Any:
        """The HOST_ITEM of `step` as numpy arrays shaped like `target`, verified against the step's
        checksums (CheckpointError if absent or damaged)."""
        self._check_has_host_item(step)
        try:
            return self._read_host_state(target, step, self.read_meta(step))
        except MhcJaxError:
            raise
        except Exception as err:  # noqa: BLE001 - damaged or unreadable: reported like `restore(step=...)`
            raise CheckpointError(f"checkpoint step {step} in {self.directory} is unreadable: "
                                  f"{_reason(err)}") from err

    def _check_has_host_item(self, step: int) -> None:
        if "://" not in self.directory and not os.path.isdir(os.path.join(self.directory, str(step), HOST_ITEM)):
            raise CheckpointError(f"checkpoint {self.directory}/{step} holds no {HOST_ITEM!r} (sparse Engram "
                                  "tables): it was written with engram.update=dense")

    def _read_host_state(self, target: Any, step: int, meta: dict) -> Any:
        out = self.manager.restore(step, args=ocp.args.Composite(  # numpy leaves restore as numpy
            **{HOST_ITEM: ocp.args.StandardRestore(target)}))
        host = jax.tree.map(lambda x: x if isinstance(x, np.ndarray) or not getattr(x, "is_fully_addressable", True)  # row shard
                            else np.asarray(x), out[HOST_ITEM])
        want = meta.get("host_checksums")
        if want is not None:  # written before host checksums existed: trusted as it is
            got = host_tree_checksums(host)
            bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            if bad:
                raise _Damaged(f"checksum mismatch in {len(bad)} of {len(want)} {HOST_ITEM} arrays (e.g. {bad[0]})")
        return host

    def _restore_step(self, abstract_state: Any, step: int, check_meta: Callable[[dict], None] | None,
                      host_target: Any = None) -> tuple[Any, dict | None, dict, int]:
        meta = self.read_meta(step)
        if check_meta is not None:
            check_meta(meta)
        if host_target is not None:
            self._check_has_host_item(step)
        items = {"state": ocp.args.StandardRestore(abstract_state)}
        has_data = os.path.isdir(os.path.join(self.directory, str(step), "data")) if "://" not in self.directory \
            else "data_digest" in meta
        if has_data:
            items["data"] = ocp.args.JsonRestore()
        out = self.manager.restore(step, args=ocp.args.Composite(**items))
        state, data = out["state"], (out["data"] if has_data else None)
        want = meta.get("checksums")
        if want is not None:  # checkpoints written before checksums existed are trusted as they are
            got = tree_checksums(state)
            bad = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
            if bad:
                raise _Damaged(f"checksum mismatch in {len(bad)} of {len(want)} arrays (e.g. {bad[0]})")
        if "data_digest" in meta and _json_digest(data) != meta["data_digest"]:
            raise _Damaged("its data-iterator state does not match its digest")
        if host_target is not None:
            self.host_state = self._read_host_state(host_target, step, meta)
        return state, _this_process(data), meta, step

    def _move_aside(self, step: int, reason: str) -> str:
        """Renames the step directory to <directory>_unreadable/<step>-<UTC time>; returns the new path."""
        dest_dir = epath.Path(self.directory + UNREADABLE_SUFFIX)
        dest = dest_dir / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        n = 1
        while dest.exists():
            n += 1
            dest = dest_dir / f"{step}-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{n}"
        if jax.process_index() == 0:
            dest_dir.mkdir(parents=True, exist_ok=True)
            epath.Path(self.directory, str(step)).rename(dest)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint_move_aside_{step}")
        self.manager.reload()
        log.warning("moved checkpoint step %d (%s) to %s", step, reason, dest)
        return str(dest)


class _DiskErrors:
    """Context manager: a full disk under Orbax (raised at save or at the async commit) -> CheckpointError."""

    def __init__(self, ckpt: Checkpointer, step: int | None):
        self.ckpt, self.step = ckpt, step

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: Any, err: BaseException | None, tb: Any) -> bool:
        if err is not None and not isinstance(err, MhcJaxError) and disk_full(err) is not None:
            raise self.ckpt._disk_full_error(self.step, err) from err
        return False


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def _reason(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return f"{type(err).__name__}: {text}"[:300]


def abstract_like(tree: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs with the given shardings for a tree of arrays (a restore target)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def pure_state(model: nnx.Module, optimizer: nnx.Optimizer) -> Any:
    """The checkpointed tree: plain nested dicts of arrays for model and optimiser."""
    return nnx.to_pure_dict(nnx.state((model, optimizer)))
