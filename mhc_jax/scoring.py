"""Batched log-likelihood scoring and generation of text requests: the engine behind the lm-evaluation-
harness adapter (mhc_jax.lm_eval_adapter) and the built-in multiple-choice scorer (mhc_jax.multiple_choice).

Each request is tokenized as in training: BOS, then the context's tokens, then the continuation's (the two
encoded separately, so the continuation's tokens are exactly those scored). A request longer than
`model.max_seq_len` keeps its last max_seq_len tokens (the continuation must fit). Requests are padded to
a length bucket (a power of two up to max_seq_len, so few shapes compile) and to whole batches whose row
count divides over the mesh's batch axes; padded positions get segment id 0. Engram ids are computed per
request on the host by the same `EngramIds` the training pipeline uses, with the row's segment ids; a model
with sparse host tables (engram.update=sparse) gets each batch's rows from its `HostTables` (`engram_tables`:
from the checkpoint with `load_scorer(workdir=...)`, from the export with `load_scorer(export_dir=...)`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mhc_jax.data.tokenizer import load_tokenizer
from mhc_jax.engram.ids import EngramIds
from mhc_jax.export import load as load_export
from mhc_jax.sampling import generate
from mhc_jax.sharding import batch_ways, make_mesh
from mhc_jax.train.sparse_rows import tables_from_workdir
from mhc_jax.train.state import load_model_from_workdir


@nnx.jit
def _token_logprobs(model, tokens_BT, targets_BT, segment_ids_BT, engram_ids, engram_rows=None):
    """(log p(target_t | tokens_<=t), target_t == argmax) for every position: (B, T) float32, (B, T) bool."""
    logits_BTV = model(tokens_BT, segment_ids_BT=segment_ids_BT, engram_ids_BTEG=engram_ids,
                       engram_rows_EUW=engram_rows)
    logp_BTV = jax.nn.log_softmax(logits_BTV, axis=-1)
    picked_BT = jnp.take_along_axis(logp_BTV, targets_BT[..., None], axis=-1)[..., 0]
    return picked_BT, jnp.argmax(logits_BTV, axis=-1) == targets_BT


class Scorer:
    """`loglikelihood`, `loglikelihood_rolling` and `generate_until` over lists of text requests."""

    def __init__(self, model: nnx.Module, tokenizer: Any, *, batch_size: int = 8, mesh: Mesh | None = None,
                 engram_tables: Any = None):
        """`engram_tables`: the `HostTables` of a model with engram.update=sparse (required there)."""
        self.model, self.tokenizer, self.cfg = model, tokenizer, model.cfg
        if self.cfg.engram.sparse and engram_tables is None:
            raise ValueError("this model has engram.update=sparse (tables in host RAM): pass engram_tables "
                             "(load_scorer reads them from the checkpoint or the export)")
        self.engram_tables = engram_tables
        self.mesh = mesh or make_mesh(self.cfg.mesh)
        ways = batch_ways(self.mesh)
        self.batch_size = -(-max(1, batch_size) // ways) * ways  # rows divide over the batch axes
        self.max_len = self.cfg.model.max_seq_len
        self.engram_ids = None
        if self.cfg.engram.enabled:
            self.engram_ids = EngramIds(self.cfg.engram, tokenizer)

    # ----------------------------------------------------------------------------------------------
    def _bucket(self, n: int) -> int:
        return min(self.max_len, max(16, 1 << (n - 1).bit_length()))

    def _score_rows(self, rows: Sequence[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        """For each token row (at most max_seq_len + 1 tokens), per-token (logprob, is_greedy) of tokens
        1.. given the ones before: arrays of length len(row) - 1."""
        out: list[tuple[np.ndarray, np.ndarray]] = [None] * len(rows)  # type: ignore[list-item]
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))  # similar lengths share a batch
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            T = self._bucket(max(len(rows[i]) - 1 for i in idx))
            tokens = np.full((self.batch_size, T), self.tokenizer.pad_id, np.int32)
            targets = np.full((self.batch_size, T), self.tokenizer.pad_id, np.int32)
            seg = np.zeros((self.batch_size, T), np.int32)
            for r, i in enumerate(idx):
                row = rows[i]
                n = len(row) - 1
                tokens[r, :n], targets[r, :n], seg[r, :n] = row[:-1], row[1:], 1
            engram = engram_rows = None
            if self.engram_ids is not None:
                engram = self.engram_ids(tokens, seg)
                if self.engram_tables is not None:  # sparse: slots into the batch's rows (one bucket per shape)
                    feed = self.engram_tables.feed(engram, engram.shape[0] * engram.shape[1] * engram.shape[3])
                    engram, engram_rows = feed.slots_BTEG, jnp.asarray(feed.rows_EUW)
                engram = jnp.asarray(engram)
            with jax.set_mesh(self.mesh):
                logp, greedy = _token_logprobs(self.model, jnp.asarray(tokens), jnp.asarray(targets),
                                               jnp.asarray(seg), engram, engram_rows)
            logp, greedy = np.asarray(logp, np.float64), np.asarray(greedy)
            for r, i in enumerate(idx):
                n = len(rows[i]) - 1
                out[i] = (logp[r, :n], greedy[r, :n])
        return out

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], int]:
        ctx = [self.tokenizer.bos_id] + self.tokenizer.encode(context)
        cont = self.tokenizer.encode(continuation)
        if not cont:
            raise ValueError(f"the continuation {continuation!r} encodes to no tokens")
        if len(cont) > self.max_len:
            raise ValueError(f"the continuation has {len(cont)} tokens, more than model.max_seq_len={self.max_len}")
        row = (ctx + cont)[-(self.max_len + 1):]  # keep the end: the continuation always fits
        return row, len(cont)

    # ----------------------------------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        """(sum of log p(continuation tokens | context), whether every continuation token is the argmax)."""
        pairs = [self._encode_pair(c, x) for c, x in requests]
        scored = self._score_rows([row for row, _ in pairs])
        return [(float(lp[-n:].sum()), bool(g[-n:].all())) for (lp, g), (_, n) in zip(scored, pairs)]

    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Log-likelihood of each whole text (every token, the first given BOS), scored in disjoint windows
        of up to max_seq_len predicted tokens that end at the text's end, each window's first token
        conditioned on the token just before it (lm-eval's rolling windows, context length 1)."""
        rows, owners, counts = [], [], []
        for k, text in enumerate(texts):
            ids = [self.tokenizer.bos_id] + self.tokenizer.encode(text)
            for end in range(len(ids), 1, -self.max_len):  # windows ending at the text's end, backwards
                begin = max(1, end - self.max_len)  # predicted tokens ids[begin:end]
                context_start = max(0, end - self.max_len - 1)
                rows.append(ids[context_start:end])
                owners.append(k)
                counts.append(end - begin)
        totals = [0.0] * len(texts)
        for (lp, _), k, n in zip(self._score_rows(rows), owners, counts):
            totals[k] += float(lp[-n:].sum())
        return totals

    def generate_until(self, requests: Sequence[tuple[str, dict[str, Any]]]) -> list[str]:
        """Greedy (or sampled, with `temperature` > 0 and `do_sample`) continuations of each context, cut
        at the first of `until` (a string or list) and at most `max_gen_toks` tokens (default 64)."""

        outs = []
        for context, kwargs in requests:
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 64))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = ([self.tokenizer.bos_id] + self.tokenizer.encode(context))[-(self.max_len - 1):]
            max_new = max(0, min(max_new, self.max_len - len(ids)))
            # One row: no mesh context (a batch of 1 does not split over the batch axes; the parameters keep
            # their shardings).
            new = generate(self.model, ids, max_new, temperature=temperature, seed=int(kwargs.get("seed", 0)),
                           engram_ids=self.engram_ids, eos_id=self.tokenizer.eos_id,
                           engram_tables=self.engram_tables) if max_new else []
            text = self.tokenizer.decode(new)
            cut = min([text.find(s) for s in until if s and s in text], default=len(text))
            outs.append(text[:cut])
        return outs


def load_scorer(workdir: str = "", export_dir: str = "", batch_size: int = 8) -> Any:
    """A Scorer of a train.py workdir (newest checkpoint) or of a folder written by mhc_jax.export."""
    if bool(workdir) == bool(export_dir):
        raise ValueError("give exactly one of workdir (a train.py workdir) and export_dir (an mhc_jax.export folder)")
    if export_dir:
        exp = load_export(export_dir)
        return Scorer(exp.model, exp.tokenizer, batch_size=batch_size, engram_tables=exp.engram_tables)
    cfg, model, step = load_model_from_workdir(workdir)
    return Scorer(model, load_tokenizer(cfg.data.tokenizer), batch_size=batch_size,
                  engram_tables=tables_from_workdir(workdir, cfg, step))  # None unless engram.update=sparse
