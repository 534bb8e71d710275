"""Packing tokenized documents into fixed-length rows with Grain's concat-then-split transform.

Each document arrives as two equal-length features, `inputs` = [BOS, t1..tn] and `targets` = [t1..tn, EOS].
Grain's `ConcatThenSplitIterDataset` concatenates documents and cuts rows of exactly `seq_len` tokens,
splitting a document that does not fit at the same point in both features, so every input token keeps its
true next token as target even across a row boundary, and no target ever belongs to another document.
It adds `*_segment_ids` (documents numbered from 1 within a row, 0 = padding) and `*_positions` (restarting
at 0 where a document, or the continuation of a split document, starts in the row).
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset

from mhc_jax.data.tokenizer import Tokenizer


class TokenizeDocument:
    """str -> {"inputs": int32 [BOS, t1..tn], "targets": int32 [t1..tn, EOS]} (a Grain map)."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self._bos = np.asarray([tokenizer.bos_id], np.int32)
        self._eos = np.asarray([tokenizer.eos_id], np.int32)

    def __call__(self, text: str) -> dict[str, np.ndarray]:
        ids = np.asarray(self.tokenizer.encode(text), dtype=np.int32)
        return {"inputs": np.concatenate([self._bos, ids]), "targets": np.concatenate([ids, self._eos])}


def _tuple_slices(state: Any) -> Any:
    """Grain compares `remainder_slices` entries with the tuple (-1, -1), but a state saved as JSON comes
    back with lists; turn them back into tuples so a restored iterator sees its remainder correctly."""
    if not isinstance(state, dict):
        return state
    return {k: ({f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _tuple_slices(v))
            for k, v in state.items()}


class _JsonSafeStateIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator):
        super().__init__(parent)

    def __next__(self) -> Any:
        return next(self._parent)

    def get_state(self) -> dict:
        return self._parent.get_state()

    def set_state(self, state: dict) -> None:
        self._parent.set_state(_tuple_slices(state))


class PackDocuments(grain.IterDataset):
    """Rows of `seq_len` tokens from tokenized documents: keys inputs, targets, inputs_segment_ids,
    inputs_positions, targets_segment_ids, targets_positions, each (seq_len,) int32. Padding (only
    after the last document of a finite dataset) is 0 with segment id 0."""

    def __init__(self, parent: grain.IterDataset, seq_len: int):
        super().__init__(parent)
        self._packed = ConcatThenSplitIterDataset(parent, length_struct={"inputs": seq_len, "targets": seq_len})

    def __iter__(self) -> grain.DatasetIterator:
        return _JsonSafeStateIterator(self._packed.__iter__())

    def __str__(self) -> str:
        return "PackDocuments(ConcatThenSplit)"
