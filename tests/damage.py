"""Ways a checkpoint gets damaged on disk (shared by the reliability and soak tests): each takes a step
directory `checkpoints/<step>` and damages it in place, returning what it touched."""

import glob
import os

import numpy as np


def _array_files(step_dir: str, item: str = "state") -> list[str]:
    """The data files of an item (`state`, or `engram_tables`: sparse Engram host tables) (OCDBT `d/`
    folders; which of them a restore reads depends on how Orbax merged the per-process writes, so damage
    goes to all of them)."""
    return sorted(f for f in glob.glob(os.path.join(step_dir, item, "**", "d", "*"), recursive=True)
                  if os.path.isfile(f) and os.path.getsize(f) >= 64)


def truncate(step_dir: str, rng: np.random.Generator | None = None) -> str:
    """Cuts every array data file of the state to half (a disk that filled up, a copy that stopped)."""
    paths = _array_files(step_dir)
    for path in paths:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    return ", ".join(paths)


def delete_metadata(step_dir: str, rng: np.random.Generator | None = None) -> str:
    """Deletes the state's _METADATA (the tree structure Orbax restores by)."""
    path = os.path.join(step_dir, "state", "_METADATA")
    os.remove(path)
    return path


def flip_bytes(step_dir: str, rng: np.random.Generator | None = None) -> str:
    """Inverts 16 bytes at a random place in the middle half of every array data file of the state
    (silent bit rot: the files keep their size; numbers or the storage's own framing change)."""
    rng = rng or np.random.default_rng(0)
    paths = _array_files(step_dir)
    for path in paths:
        data = bytearray(open(path, "rb").read())
        start = int(rng.integers(len(data) // 4, 3 * len(data) // 4 - 16))
        for i in range(start, start + 16):
            data[i] ^= 0xFF
        with open(path, "wb") as f:
            f.write(bytes(data))
    return ", ".join(paths)


KINDS = {"truncate": truncate, "delete_metadata": delete_metadata, "flip_bytes": flip_bytes}
