"""Sampling from a model with a KV cache: greedy, temperature, top-k and top-p, as a library.

`generate(model, prompt_ids, n)` continues token ids; `generate_text(model, tokenizer, prompt, n)` continues
text. Engram ids of each new token are computed on the host by the same `EngramIds` the input pipeline
uses, so generation sees exactly the ids training saw; a new token's n-grams reach back max_ngram - 1 tokens,
so each decode step hashes only the last max_ngram tokens (O(1) per token, not the whole history). With
sparse host tables (engram.update=sparse) the new tokens' rows come from the `HostTables`. The command line is
`python -m mhc_jax.generate` (mhc_jax/generate.py).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.config import Config, ConfigError
from mhc_jax.distributed import replicated, to_host
from mhc_jax.engram.ids import EngramIds

EngramIdFn = Callable[[np.ndarray], np.ndarray]  # tokens (B, T) -> int32 (B, T, E, G)


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    """ConfigError naming the value and what is allowed, for sampling settings that would not sample."""
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"temperature={temperature!r} is not allowed: must be a finite number >= 0 (0 = greedy)")
    if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ConfigError(f"top_p={top_p!r} is not allowed: must be in (0, 1] (1 = no nucleus filtering)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ConfigError(f"top_k={top_k!r} is not allowed: must be an integer >= 0 (0 = no top-k filtering)")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ConfigError(f"max_new_tokens={max_new_tokens!r} is not allowed: must be an integer >= 0")


def unbounded_context(cfg: Config) -> bool:
    """True when every block is windowed: each KV cache is then a ring of `attention_window` slots and any
    generation length fits (positions beyond max_seq_len are fine for RoPE and ALiBi)."""
    return cfg.model.attention_window > 0 and cfg.model.global_every == 0


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


# The PRNG key travels as its raw uint32 data (`jax.random.key_data`), which can be a replicated global
# array on several processes like every other input.
@nnx.jit(static_argnums=(5, 6, 7))
def _decode_and_sample(model, tokens_BT, positions_BT, cache, engram, temperature, top_k, top_p, key_data):
    logits, cache = model.decode(tokens_BT, positions_BT, cache, *engram)
    key = jax.random.wrap_key_data(key_data)
    return sample_token(logits[:, -1], key, temperature, top_k, top_p), cache


@nnx.jit(static_argnums=(4, 5, 6))
def _full_and_sample(model, tokens_BT, engram, last, temperature, top_k, top_p, key_data):
    logits = model(tokens_BT, engram_ids_BTEG=engram[0], engram_rows_EUW=engram[1])
    key = jax.random.wrap_key_data(key_data)
    return sample_token(jnp.take(logits, last, axis=1), key, temperature, top_k, top_p), None


def generate(model: nnx.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, engram_ids: EngramIdFn | None = None,
             use_cache: bool = True, eos_id: int | None = None, engram_tables: Any = None) -> list[int]:
    """Continues `prompt_ids` by up to `max_new_tokens` tokens (stops early at `eos_id`). With
    `use_cache=False` every step recomputes the whole sequence (a reference for the cached path).
    `engram_tables`: the `HostTables` of a model with engram.update=sparse.

    On several processes every process must call it with the same arguments under the model's mesh
    (`jax.set_mesh`): the inputs become replicated global arrays and all return the same tokens."""
    cfg: Config = model.cfg
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if not prompt_ids:
        raise ConfigError("the prompt must hold at least one token (e.g. the tokenizer's BOS id)")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.model.max_seq_len and not unbounded_context(cfg):
        raise ConfigError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                          f"exceeds model.max_seq_len={cfg.model.max_seq_len}; shorten the prompt or ask for "
                          f"fewer tokens")
    if cfg.engram.enabled and engram_ids is None:
        raise ValueError("this model has Engram layers: pass engram_ids=EngramIds(cfg.engram, tokenizer)")
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
            return replicated(out), None
        feed = engram_tables.feed(out, out.shape[1] * out.shape[3])  # a static bucket per call shape
        return replicated(feed.slots_BTEG), replicated(feed.rows_EUW)

    def key_data(k: jax.Array) -> jax.Array:
        return replicated(np.asarray(jax.random.key_data(k)))

    if use_cache:
        cache = model.init_cache(1, cfg.model.max_seq_len)
        if jax.process_count() > 1:
            cache = jax.tree.map(lambda a: replicated(np.asarray(a)), cache)
        step_tokens = np.asarray(tokens, np.int32)[None]
        positions = np.arange(len(tokens), dtype=np.int32)[None]
        step_ids = ids_of(tokens, len(tokens))
        for _ in range(max_new_tokens):
            key, sub = jax.random.split(key)
            nxt, cache = _decode_and_sample(model, replicated(step_tokens), replicated(positions), cache,
                                            step_ids, temperature, top_k, top_p, key_data(sub))
            token = int(to_host(nxt)[0])
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
            nxt, _ = _full_and_sample(model, replicated(buf), ids_of(tokens, 0, pad_to=total),
                                      len(tokens) - 1, temperature, top_k, top_p, key_data(sub))
            token = int(to_host(nxt)[0])
            tokens.append(token)
            if token == eos_id:
                break
    return tokens[len(prompt_ids):]


def fit_prompt(ids: list[int], max_new_tokens: int, max_seq_len: int) -> tuple[list[int], int]:
    """(ids, dropped): `ids` (BOS first) cut from the left, after its BOS, so that the prompt and
    `max_new_tokens` new tokens fit the context; ConfigError when even one prompt token would not fit."""
    room = max_seq_len - max_new_tokens
    if room < 2:
        raise ConfigError(f"max_new_tokens={max_new_tokens} is not allowed: with the BOS token and at least one "
                          f"prompt token it must be <= model.max_seq_len - 2 = {max_seq_len - 2}")
    dropped = max(0, len(ids) - room)
    return (ids[:1] + ids[1 + dropped:] if dropped else ids), dropped


def generate_text(model: nnx.Module, tokenizer, prompt: str, max_new_tokens: int, **kwargs: Any) -> str:
    """Prompt text -> generated continuation text (BOS first, as in training). A prompt longer than the
    context leaves for `max_new_tokens` keeps its last tokens, with a warning on stderr."""
    cfg: Config = model.cfg
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    dropped = 0
    if not unbounded_context(cfg):
        ids, dropped = fit_prompt(ids, max_new_tokens, cfg.model.max_seq_len)
    if dropped:
        print(f"warning: the prompt is {len(ids) - 1 + dropped} tokens; its first {dropped} were dropped so that "
              f"it and max_new_tokens={max_new_tokens} fit model.max_seq_len={cfg.model.max_seq_len}",
              file=sys.stderr)
    engram_fn = EngramIds(cfg.engram, tokenizer) if cfg.engram.enabled else None
    new = generate(model, ids, max_new_tokens, engram_ids=engram_fn, eos_id=tokenizer.eos_id, **kwargs)
    return tokenizer.decode(new)
