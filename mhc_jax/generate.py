"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

    python -m mhc_jax.generate --workdir DIR --prompt "def main(" --max-new-tokens 200 --temperature 0.8

Engram ids of each new token are computed on the host by the same `EngramIds` the input pipeline uses,
from the whole token history, so generation sees exactly the ids training saw.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mhc_jax.config import Config
from mhc_jax.distributed import replicated, to_host

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


# The PRNG key travels as its raw uint32 data (`jax.random.key_data`), which can be a replicated global
# array on several processes like every other input.
@nnx.jit(static_argnums=(5, 6, 7))
def _decode_and_sample(model, tokens_BT, positions_BT, cache, engram_ids, temperature, top_k, top_p, key_data):
    logits, cache = model.decode(tokens_BT, positions_BT, cache, engram_ids)
    key = jax.random.wrap_key_data(key_data)
    return sample_token(logits[:, -1], key, temperature, top_k, top_p), cache


@nnx.jit(static_argnums=(4, 5, 6))
def _full_and_sample(model, tokens_BT, engram_ids, last, temperature, top_k, top_p, key_data):
    logits = model(tokens_BT, engram_ids_BTLk=engram_ids)
    key = jax.random.wrap_key_data(key_data)
    return sample_token(jnp.take(logits, last, axis=1), key, temperature, top_k, top_p), None


def generate(model: nnx.Module, prompt_ids: list[int], max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int = 0, top_p: float = 1.0, seed: int = 0, engram_ids: EngramIdFn | None = None,
             use_cache: bool = True, eos_id: int | None = None) -> list[int]:
    """Continues `prompt_ids` by up to `max_new_tokens` tokens (stops early at `eos_id`). With
    `use_cache=False` every step recomputes the whole sequence (a reference for the cached path).

    On several processes every process must call it with the same arguments under the model's mesh
    (`jax.set_mesh`): the inputs become replicated global arrays and all return the same tokens."""
    cfg: Config = model.cfg
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token (e.g. the tokenizer's BOS id)")
    total = len(prompt_ids) + max_new_tokens
    if total > cfg.model.max_seq_len:
        raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                         f"exceeds model.max_seq_len={cfg.model.max_seq_len}")
    if cfg.engram.enabled and engram_ids is None:
        raise ValueError("this model has Engram layers: pass engram_ids=EngramIds(cfg, tokenizer)")
    key = jax.random.key(seed)
    tokens = list(prompt_ids)

    def ids_of(history: list[int], last_n: int, pad_to: int | None = None) -> jax.Array | None:
        if engram_ids is None:
            return None
        arr = np.asarray(history, np.int32)[None]
        if pad_to is not None:
            arr = np.pad(arr, ((0, 0), (0, pad_to - arr.shape[1])))
        out = engram_ids(arr)
        return replicated(out if pad_to is not None else out[:, -last_n:])

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


def generate_text(model: nnx.Module, tokenizer, prompt: str, max_new_tokens: int, **kwargs) -> str:
    """Prompt text -> generated continuation text (BOS first, as in training)."""
    from mhc_jax.engram.ids import EngramIds  # only needed with Engram

    cfg: Config = model.cfg
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    engram_fn = EngramIds(cfg, tokenizer) if cfg.engram.enabled else None
    new = generate(model, ids, max_new_tokens, engram_ids=engram_fn, eos_id=tokenizer.eos_id, **kwargs)
    return tokenizer.decode(new)


def main(argv: list[str] | None = None) -> int:
    from mhc_jax.data.tokenizer import load_tokenizer
    from mhc_jax.distributed import add_launch_args, is_main_process, resolve_launch
    from mhc_jax.errors import ConfigError
    from mhc_jax.train.state import join_and_load_model

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", required=True, help="a workdir written by train.py")
    p.add_argument("--prompt", default="", help="prompt text")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    add_launch_args(p)
    args = p.parse_args(argv)
    try:
        cfg, model, step, mesh = join_and_load_model(args.workdir, resolve_launch(args), args.step)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    max_new = min(args.max_new_tokens, cfg.model.max_seq_len - 1 - len(tokenizer.encode(args.prompt)))
    with jax.set_mesh(mesh):  # every process generates (the parameters are sharded over all of them)
        text = generate_text(model, tokenizer, args.prompt, max_new, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, seed=args.seed)
    if is_main_process():
        print(f"[checkpoint step {step}]")
        print(args.prompt + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
