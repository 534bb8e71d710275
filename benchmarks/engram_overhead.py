"""Engram overhead on CPU, one run: train-step time with Engram at two layers vs. the same model without,
host hasher throughput, and hash collision rates on a real corpus (byte tokenizer).

Paper reference (Engram paper Table 4): a 100B-parameter host-resident table cost < 3% inference throughput
on an H800. This script measures the training-step ratio of a tiny CPU model, where the table gather and the
gate are a visible fraction of the work, so expect a much larger ratio than the paper's.

    python benchmarks/engram_overhead.py --quick
"""

from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from _common import (REPO, RESULTS, compile_seconds, format_table, interleaved_medians, seconds_per_call,
                     write_result)
from mhc_jax.config import Config
from mhc_jax.data import synthetic_batch
from mhc_jax.data.tokenizer import ByteTokenizer
from mhc_jax.engram.ids import EngramIds
from mhc_jax.model.transformer import Transformer, count_params
from mhc_jax.train.optimizer import make_optimizer
from mhc_jax.train.step import train_step

CORPUS = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")  # ../shared beside the checkout


def make_cfg(engram: bool, quick: bool) -> Config:
    d, layers, seq, batch = (64, 4, 64, 8) if quick else (128, 6, 128, 16)
    return Config().replace(
        model=dict(d_model=d, n_layers=layers, n_heads=4, n_kv_heads=4, d_ff=4 * d, max_seq_len=seq),
        data=dict(seq_len=seq, batch_size=batch), training=dict(steps=1000),
        engram=dict(enabled=engram, layers=[1, layers // 2 + 1], heads_per_ngram=8, head_dim=16,
                    table_size=5 * 259))  # demo sizing: base = 5 x tokenizer vocab


def corpus_tokens(tok: ByteTokenizer, n_chars: int) -> np.ndarray:
    with open(CORPUS, encoding="utf-8") as f:
        return np.asarray(tok.encode(f.read()[:n_chars]), np.int32)


def step_times(cfgs: dict[str, Config], tokens: np.ndarray, steps: int) -> tuple[dict[str, float], dict[str, int]]:
    """Median train-step seconds of each config (steps interleaved) and its parameter count."""
    fns, params = {}, {}
    for name, cfg in cfgs.items():
        model = Transformer(cfg, rngs=nnx.Rngs(0))
        engram_ids = EngramIds(cfg.engram, ByteTokenizer()) if cfg.engram.enabled else None
        batch = jax.tree.map(jnp.asarray, synthetic_batch(cfg, tokens=tokens, engram_ids=engram_ids))
        fns[name] = functools.partial(train_step, model, make_optimizer(cfg, model), batch)
        compile_seconds(fns[name])
        params[name] = count_params(model)
    return interleaved_medians(fns, rounds=steps, calls=1), params


def hasher_throughput(cfg: Config, tokens: np.ndarray, repeats: int) -> dict:
    engram_ids = EngramIds(cfg.engram, ByteTokenizer())
    T = 4096
    rows = tokens[: (tokens.size // T) * T].reshape(-1, T)[:16]
    engram_ids(rows)  # warm caches
    dt = seconds_per_call(lambda: engram_ids(rows), repeats)
    n_hashes = rows.size * len(cfg.engram.layers) * engram_ids.ids_per_position
    return {"tokens_per_s": rows.size / dt, "hashes_per_s": n_hashes / dt, "batch_shape": list(rows.shape)}


def collision_rates(cfg: Config, tokens: np.ndarray) -> list[dict]:
    """Per layer and order: distinct n-grams (in compressed ids) against the table slots they land in."""
    engram_ids = EngramIds(cfg.engram, ByteTokenizer())
    e = cfg.engram
    compressed = engram_ids.vocab(tokens[None, :])
    ids = engram_ids(tokens[None, :])[0]  # (T, L, (N-1) * K)
    out = []
    for n in range(2, e.max_ngram + 1):
        # An n-gram is the tuple of its n compressed ids (pad-filled at the very start).
        cols = [np.concatenate([np.full(k, engram_ids.pad_id), compressed[0, : compressed.shape[1] - k]])
                for k in range(n)]
        grams, gram_of_pos = np.unique(np.stack(cols, axis=1), axis=0, return_inverse=True)
        gram_of_pos = gram_of_pos.reshape(-1)
        for j, layer in enumerate(e.layers):
            heads = slice((n - 2) * e.heads_per_ngram, (n - 1) * e.heads_per_ngram)
            primes = engram_ids.hasher.primes[layer][n - 2]
            # Slot of each distinct n-gram in every head (first occurrence is representative).
            first = np.unique(gram_of_pos, return_index=True)[1]
            slots_GK = ids[first, j, heads]
            collide_any, collide_all = np.zeros(len(grams), bool), np.ones(len(grams), bool)
            for k in range(e.heads_per_ngram):
                _, inv, counts = np.unique(slots_GK[:, k], return_inverse=True, return_counts=True)
                shared = counts[inv] > 1
                collide_any |= shared
                collide_all &= shared
            # Two n-grams are confused only if they share a slot in every head at once.
            _, full_counts = np.unique(slots_GK, axis=0, return_counts=True)
            out.append({"layer": layer, "order": n, "distinct_ngrams": int(len(grams)),
                        "slots_per_head": int(primes[0]), "ngrams_per_slot": len(grams) / float(primes.mean()),
                        "frac_sharing_a_slot_in_one_head": float(collide_any.mean()),
                        "frac_sharing_in_every_head": float(collide_all.mean()),
                        "frac_indistinguishable": float(1 - len(full_counts) / len(grams))})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small model and few steps (< 1 minute)")
    args = parser.parse_args()
    tok = ByteTokenizer()
    tokens = corpus_tokens(tok, 200_000 if args.quick else 1_000_000)
    steps = 10 if args.quick else 30

    base_cfg, engram_cfg = make_cfg(False, args.quick), make_cfg(True, args.quick)
    seconds, params = step_times({"base": base_cfg, "engram": engram_cfg}, tokens, steps)
    (t_base, t_engram), (p_base, p_engram) = seconds.values(), params.values()
    throughput = hasher_throughput(engram_cfg, tokens, 3 if args.quick else 10)
    collisions = collision_rates(engram_cfg, tokens)

    result = {"device": jax.devices()[0].device_kind, "quick": args.quick,
              "model": {"d_model": base_cfg.model.d_model, "n_layers": base_cfg.model.n_layers,
                        "batch": base_cfg.data.batch_size, "seq_len": base_cfg.data.seq_len},
              "engram_layers": list(engram_cfg.engram.layers), "params_base": p_base, "params_engram": p_engram,
              "step_time_ratio_engram_over_base": t_engram / t_base, "hasher": throughput,
              "collisions": collisions, "corpus_tokens": int(tokens.size)}
    print(f"train step (CPU, {base_cfg.model.n_layers} layers, d={base_cfg.model.d_model}, "
          f"B={base_cfg.data.batch_size}, T={base_cfg.data.seq_len}): Engram at layers "
          f"{list(engram_cfg.engram.layers)} / none = {t_engram / t_base:.3f}x "
          f"(params {p_engram:,} vs {p_base:,})")
    print(f"hasher: {throughput['hashes_per_s']:.3g} hashes/s, {throughput['tokens_per_s']:.3g} tokens/s "
          f"(2 layers x {engram_cfg.engram.max_ngram - 1} orders x {engram_cfg.engram.heads_per_ngram} heads)")
    print(format_table(["layer", "order", "n-grams", "slots/head", "grams/slot", "share 1 head", "share all",
                        "confused"],
                       [[str(c["layer"]), str(c["order"]), c["distinct_ngrams"], c["slots_per_head"],
                         c["ngrams_per_slot"], c["frac_sharing_a_slot_in_one_head"],
                         f"{c['frac_sharing_in_every_head']:.4f}", f"{c['frac_indistinguishable']:.4f}"]
                        for c in collisions]))
    print(f"wrote {write_result(os.path.join(RESULTS, 'engram_overhead.json'), result)}")


if __name__ == "__main__":
    main()
