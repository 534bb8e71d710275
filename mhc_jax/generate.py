"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

    python -m mhc_jax.generate --workdir DIR --prompt "def main(" --max-new-tokens 200 --temperature 0.8

Engram ids of each new token are computed on the host by the same `EngramIds` the input pipeline uses, so
generation sees exactly the ids training saw. A new token's n-grams reach back at most max_ngram - 1 tokens,
so each decode step hashes only the last max_ngram tokens (O(1) per token, not the whole history). With
sparse host tables (engram.update=sparse) the new token's rows are gathered from the `HostTables`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.config import Config

EngramIdFn = Callable[[np.ndarray], np.ndarray]  # tokens (B, T) -> int32 (B, T, L, k)


def filter_logits(logits_BV: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    """Scaled logits with everything outside the top-k / top-p (nucleus) set at -inf."""
    logits = logits_BV / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, min(top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token is always kept).
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def sample_token(logits_BV: jax.Array, key: jax.Array, temperature: float, top_k: int, top_p: float) -> jax.Array:
    if temperature <= 0.0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits_BV, temperature, top_k, top_p)).astype(jnp.int32)


@nnx.jit(static_argnums=(5, 6, 7))
def _decode_and_sample(model, tokens_BT, positions_BT, cache, engram, temperature, top_k, top_p, key):
    logits, cache = model.decode(tokens_BT, positions_BT, cache, *engram)
    return sample_token(logits[:, -1], key, temperature, top_k, top_p), cache


@nnx.jit(static_argnums=(4, 5, 6))
def _full_and_sample(model, tokens_BT, engram, last, temperature, top_k, top_p, key):
    logits = model(tokens_BT, engram_ids_BTLk=engram[0], engram_rows_LRD=engram[1])
    return sample_token(jnp.take(logits, last, axis=1), key, temperature, top_k, top_p), None


def generate(model: nnx.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, engram_ids: EngramIdFn | None = None,
             use_cache: bool = True, eos_id: int | None = None, engram_tables: Any = None) -> list[int]:
    """Continues `prompt_ids` by up to `max_new_tokens` tokens (stops early at `eos_id`). With
    `use_cache=False` every step recomputes the whole sequence (a reference for the cached path).
    `engram_tables`: the `HostTables` of a model with engram.update=sparse."""
    cfg: Config = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token (e.g. the tokenizer's BOS id)")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.model.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.engram.enabled and engram_ids is None:
        raise ValueError("this model has Engram layers: pass engram_ids=EngramIds(cfg, tokenizer)")
    if cfg.engram.sparse and engram_tables is None:
        raise ValueError("this model has engram.update=sparse (tables in host RAM): pass engram_tables=HostTables")
    key = jax.random.key(seed)
    tokens = list(prompt_ids)

    def ids_of(history: list[int], last_n: int, pad_to: int | None = None) -> tuple[jax.Array | None, ...]:
        """(engram ids, sparse rows or None) of the last `last_n` tokens of `history` (all of it, padded)."""
        if engram_ids is None:
            return None, None
        if pad_to is None:  # the last last_n tokens' n-grams reach max_ngram - 1 tokens further back
            history = history[-(last_n + cfg.engram.max_ngram - 1):]
        arr = np.asarray(history, np.int32)[None]
        if pad_to is not None:
            arr = np.pad(arr, ((0, 0), (0, pad_to - arr.shape[1])))
        out = engram_ids(arr)
        out = out if pad_to is not None else out[:, -last_n:]
        if engram_tables is None:
            return jnp.asarray(out), None
        feed = engram_tables.feed(out, out.shape[1] * out.shape[3])  # a static bucket per call shape
        return jnp.asarray(feed.slots_BTLk), jnp.asarray(feed.rows_LRD)

    if use_cache:
        cache = model.init_cache(1, cfg.model.max_seq_len)
        step_tokens = np.asarray(tokens, np.int32)[None]
        positions = np.arange(len(tokens), dtype=np.int32)[None]
        step_ids = ids_of(tokens, len(tokens))
        for _ in range(max_new_tokens):
            key, sub = jax.random.split(key)
            nxt, cache = _decode_and_sample(model, jnp.asarray(step_tokens), jnp.asarray(positions), cache,
                                            step_ids, temperature, top_k, top_p, sub)
            token = int(nxt[0])
            tokens.append(token)
            if token == eos_id:
                break
            step_tokens = np.asarray([[token]], np.int32)
            positions = np.asarray([[len(tokens) - 1]], np.int32)
            step_ids = ids_of(tokens, 1)
    else:
        # A fixed-size buffer: the model is causal, so tokens after position `last` do not change its logits.
        for _ in range(max_new_tokens):
            key, sub = jax.random.split(key)
            buf = np.zeros((1, total), np.int32)
            buf[0, :len(tokens)] = tokens
            nxt, _ = _full_and_sample(model, jnp.asarray(buf), ids_of(tokens, 0, pad_to=total),
                                      len(tokens) - 1, temperature, top_k, top_p, sub)
            token = int(nxt[0])
            tokens.append(token)
            if token == eos_id:
                break
    return tokens[len(prompt_ids):]


def generate_text(model: nnx.Module, tokenizer, prompt: str, max_new_tokens: int, **kwargs: Any) -> str:
    """Prompt text -> generated continuation text (BOS first, as in training)."""
    from mhc_jax.engram.ids import EngramIds  # only needed with Engram

    cfg: Config = model.cfg
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    engram_fn = EngramIds(cfg, tokenizer) if cfg.engram.enabled else None
    new = generate(model, ids, max_new_tokens, engram_ids=engram_fn, eos_id=tokenizer.eos_id, **kwargs)
    return tokenizer.decode(new)


def main(argv: list[str] | None = None) -> int:
    from mhc_jax.data.tokenizer import load_tokenizer
    from mhc_jax.train.state import load_model_from_workdir

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    args = p.parse_args(argv)
    cfg, model, step = load_model_from_workdir(args.workdir, step=args.step)
    from mhc_jax.train.sparse_rows import tables_from_workdir
    tables = tables_from_workdir(args.workdir, cfg, step)  # engram.update=sparse: tables in host RAM
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    max_new = min(args.max_new_tokens, cfg.model.max_seq_len - 1 - len(tokenizer.encode(args.prompt)))
    text = generate_text(model, tokenizer, args.prompt, max_new, temperature=args.temperature,
                         top_k=args.top_k, top_p=args.top_p, seed=args.seed, engram_tables=tables)
    print(f"[checkpoint step {step}]")
    print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
