"""`run(cfg, workdir)`: the training loop behind train.py.

Data flows one way: config -> Grain batches (global arrays on the mesh) -> the jitted sharded step ->
metrics, and every `checkpoint.every` steps an Orbax checkpoint of model, optimiser, step, data-iterator
state and config. Re-running with the same workdir resumes from the newest readable checkpoint; SIGTERM or
SIGINT saves a checkpoint before exiting.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Any

import jax
import numpy as np
from flax import nnx

from mhc_jax.config import Config, load_config, save_config, to_dict
from mhc_jax.errors import ConfigError, TrainingError
from mhc_jax.data import load_tokenizer, make_eval_iterator, make_train_iterator
from mhc_jax.flops import model_flops_per_token
from mhc_jax.sharding import batch_shardings, make_mesh, maybe_initialize_distributed
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.evaluation import evaluate_model, token_byte_lengths
from mhc_jax.train.metrics import MetricsWriter, measure_peak_flops
from mhc_jax.train.optimizer import lr_schedule
from mhc_jax.train.state import CHECKPOINT_DIR, CONFIG_FILE, init_train_state, restore_train_state
from mhc_jax.train import sparse_rows
from mhc_jax.train.step import make_sharded_step

log = logging.getLogger(__name__)

# Sections that must match between a checkpoint and the config resuming from it (the rest, e.g. steps
# or logging intervals, may change between runs).
_SHAPE_SECTIONS = ("model", "residual", "engram")


@dataclass
class RunResult:
    step: int
    status: str  # "finished" | "preempted"
    train_loss: float = float("nan")
    eval: dict[str, float] = field(default_factory=dict)
    sample: str = ""
    workdir: str = ""


def _ensure_workdir(workdir: str) -> None:
    if "://" in workdir:  # gs://... : Orbax and TensorBoard write there directly
        return
    try:
        os.makedirs(workdir, exist_ok=True)
        probe = os.path.join(workdir, ".write_test")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f"workdir {workdir!r} is not writable ({err.strerror}); pass --workdir to a "
                          "directory you can write") from err


def _check_resumable(workdir: str, cfg: Config) -> None:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        return
    saved = to_dict(load_config(path))
    now = to_dict(cfg)
    for section in _SHAPE_SECTIONS:
        if saved[section] != now[section]:
            diff = {k: (saved[section][k], now[section][k]) for k in now[section] if saved[section][k] != now[section][k]}
            raise ConfigError(f"workdir {workdir!r} holds a run whose {section} config differs from this one "
                              f"(saved vs. now: {diff}); use a new --workdir or the saved config")


class _Preemption:
    """Turns SIGTERM / SIGINT into a flag the loop checks after each step (then it saves and exits)."""

    def __init__(self) -> None:
        self.signal: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "_Preemption":
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. a notebook worker): no handler
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(cfg: Config, workdir: str, *, progress: bool = True) -> RunResult:
    """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns the final step's summary."""
    maybe_initialize_distributed()
    _ensure_workdir(workdir)
    _check_resumable(workdir, cfg)
    is_main = jax.process_index() == 0
    if is_main and "://" not in workdir:
        save_config(cfg, os.path.join(workdir, CONFIG_FILE))
    mesh = make_mesh(cfg.mesh)
    t = cfg.training
    writer = MetricsWriter(workdir, enabled=is_main)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    byte_lengths = token_byte_lengths(tokenizer)
    schedule = lr_schedule(cfg.optimizer, t.steps)
    flops_per_token = model_flops_per_token(cfg)
    peak = t.peak_flops or measure_peak_flops()
    result = RunResult(step=0, status="finished", workdir=workdir)

    with jax.set_mesh(mesh), _Preemption() as preempt:
        graphdef, state, shardings = init_train_state(cfg, mesh)
        rows = tables = None  # sparse Engram: host tables and the prefetcher of their rows (train/sparse_rows)
        if cfg.engram.sparse:
            tables = sparse_rows.host_tables(cfg)
            rows = train_iter = sparse_rows.row_prefetcher(cfg, mesh, make_train_iterator(cfg), tables)
        else:
            train_iter = make_train_iterator(cfg, mesh=mesh)
        start = 0
        if ckpt.latest_step() is not None:
            state, data_state, meta, start = restore_train_state(ckpt, graphdef, state, shardings)
            if tables is not None:
                sparse_rows.restore_tables(ckpt, tables, start)
            if data_state is not None:
                train_iter.set_state(data_state)
            print(f"resumed from {ckpt.directory}/{start} (step {start})", flush=True)
        result.step = start
        if start >= t.steps:
            print(f"already trained to step {start} >= training.steps={t.steps}; nothing to do", flush=True)

        step_fn = None
        pending: list[tuple[int, dict[str, jax.Array]]] = []
        nonfinite_run = 0
        window_start = time.perf_counter()
        bar = None
        if progress and is_main:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True)

        def flush() -> None:
            nonlocal nonfinite_run, window_start
            if not pending:
                return
            host = jax.device_get([m for _, m in pending])
            elapsed = time.perf_counter() - window_start
            step_time = elapsed / len(pending)
            for (s, _), m in zip(pending, host):
                tokens_per_s = float(m["tokens"]) / max(step_time, 1e-9)
                row = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": float(schedule(s)),
                       "tokens_per_s": tokens_per_s, "step_time": step_time,
                       "mfu": flops_per_token * tokens_per_s / (peak * jax.device_count()),
                       "nonfinite": bool(m["nonfinite"])}
                writer.write(s + 1, "train", row)
                nonfinite_run = nonfinite_run + 1 if m["nonfinite"] else 0
                result.train_loss = float(m["loss"])
                if nonfinite_run >= t.max_nonfinite_in_row:
                    raise TrainingError(
                        f"loss or gradients were NaN/Inf for {nonfinite_run} steps in a row (up to step {s + 1}); "
                        f"those updates were skipped. Lower optimizer.lr (now {cfg.optimizer.lr}), enable "
                        f"clipping, or raise training.max_nonfinite_in_row (now {t.max_nonfinite_in_row}).")
            if bar is not None:
                bar.update(len(pending))
                bar.set_postfix(loss=f"{result.train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            pending.clear()
            window_start = time.perf_counter()

        def run_eval(step: int) -> dict[str, float]:
            model, _ = nnx.merge(graphdef, state)
            batches = (make_eval_iterator(cfg, mesh=mesh) if rows is None
                       else sparse_rows.with_rows(cfg, mesh, tables, make_eval_iterator(cfg)))
            out = evaluate_model(model, batches, t.eval_batches, byte_lengths)
            writer.write(step, "eval", out)
            if is_main:
                print(f"\nstep {step}: eval loss {out['loss']:.4f}  ppl {out['perplexity']:.2f}  "
                      f"bpb {out['bits_per_byte']:.4f}", flush=True)
            return out

        def run_diagnostics(step: int, batch: dict[str, jax.Array]) -> None:
            if cfg.engram.enabled:
                engram_diagnostics(step, batch)
            if cfg.residual.kind == "plain":
                return
            from mhc_jax.diagnostics import amax_gains, collect_h_res
            model, _ = nnx.merge(graphdef, state)
            tokens = batch["inputs"][:1]
            h_res = collect_h_res(model, tokens, engram_ids_BTLk=None if "engram_ids" not in batch
                                  else batch["engram_ids"][:1])
            gains = {k: np.asarray(v) for k, v in amax_gains(h_res).items()}
            writer.write(step, "diagnostics", {
                "composite_fwd_max": float(gains["composite_fwd"].max()),
                "composite_bwd_max": float(gains["composite_bwd"].max()),
                "layer_fwd_max": float(gains["per_layer_fwd"].max()),
                "layer_bwd_max": float(gains["per_layer_bwd"].max())})

        def engram_diagnostics(step: int, batch: dict[str, jax.Array]) -> None:
            from mhc_jax.diagnostics import engram_gate_stats
            model, _ = nnx.merge(graphdef, state)
            out = engram_gate_stats(model, batch)
            out.update(sparse_rows.stats(rows) if rows is not None else sparse_rows.dense_hit_stats(cfg, batch))
            writer.write(step, "diagnostics", out)

        step = start
        try:
            for step in range(start, t.steps):
                batch = next(train_iter)
                if step_fn is None:
                    step_fn = make_sharded_step(graphdef, shardings, batch_shardings(batch, mesh))
                state, metrics = step_fn(state, batch)
                if rows is not None:
                    rows.apply(metrics)  # row-wise Adam of the batch's rows in host memory
                pending.append((step, metrics))
                done = step + 1
                last = done == t.steps
                if done % t.log_every == 0 or last or preempt.signal is not None:
                    flush()
                if t.diagnostics_every and (done % t.diagnostics_every == 0 or last):
                    run_diagnostics(done, batch)
                if done % t.eval_every == 0 or last:
                    result.eval = run_eval(done)
                if done % cfg.checkpoint.every == 0 or last or preempt.signal is not None:
                    ckpt.save(done, nnx.to_pure_dict(state), train_iter.get_state(),
                              {"step": done, "config": to_dict(cfg)}, force=True,
                              host_state=None if tables is None else tables.state_dict(copy=cfg.checkpoint.async_save))
                result.step = done
                if preempt.signal is not None:
                    result.status = "preempted"
                    break
            flush()
        finally:
            ckpt.close()
            if rows is not None:
                rows.close()
            if bar is not None:
                bar.close()

        if result.status == "finished" and is_main and t.sample_tokens > 0 and start < t.steps:
            from mhc_jax.generate import generate_text
            model, _ = nnx.merge(graphdef, state)
            budget = cfg.model.max_seq_len - 2 - len(tokenizer.encode(t.sample_prompt))
            result.sample = t.sample_prompt + generate_text(
                model, tokenizer, t.sample_prompt, max(0, min(t.sample_tokens, budget)),
                temperature=0.8, top_k=40, seed=t.seed, engram_tables=tables)
    writer.close()
    if preempt.signal is not None:
        print(f"\nstopped by signal {preempt.signal} at step {result.step}; checkpoint saved in "
              f"{ckpt.directory}. Re-run the same command to resume.", flush=True)
    return result
