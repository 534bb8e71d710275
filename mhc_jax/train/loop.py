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

from mhc_jax.config import Config, save_config, to_dict
from mhc_jax.errors import ConfigError, TrainingError
from mhc_jax.data.pipeline import load_tokenizer, make_eval_iterator, make_train_iterator
from mhc_jax.diagnostics import amax_gains, collect_h_res
from mhc_jax.flops import model_flops_per_token
from mhc_jax.sampling import generate_text
from mhc_jax.sharding import batch_shardings, make_mesh, maybe_initialize_distributed
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.evaluation import evaluate_model, token_byte_lengths
from mhc_jax.train.metrics import MetricsWriter, measure_peak_flops
from mhc_jax.train.optimizer import lr_schedule
from mhc_jax.train.profile import StepProfiler, finish_run
from mhc_jax.train.state import CHECKPOINT_DIR, CONFIG_FILE, init_train_state, restore_train_state
from mhc_jax.train.step import make_sharded_step

log = logging.getLogger(__name__)

# Sections that must match between a checkpoint and the config resuming from it (the rest, e.g. steps
# or logging intervals, may change between runs).
_SHAPE_SECTIONS = ("model", "residual", "engram")


@dataclass
class RunResult:
    step: int
    status: str  # "finished" | "preempted" | "nothing_to_train"
    train_loss: float = float("nan")
    eval: dict[str, float] = field(default_factory=dict)
    sample: str = ""
    workdir: str = ""
    plots: list[str] = field(default_factory=list)  # PNGs written at the end of the run (mhc_jax.plot)


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


# Data keys whose change makes the saved data-iterator state meaningless for this run: refused.
_DATA_IDENTITY = ("dataset", "tokenizer", "text_key", "train_split")
# Keys that only change what is logged or when: resumed with a different value without a word.
_QUIET_KEYS = ("training.log_every", "training.eval_every", "training.eval_batches", "training.diagnostics_every",
               "training.sample_tokens", "training.sample_prompt", "training.peak_flops", "data.data_dir",
               "data.prefetch", "data.read_threads", "data.eval_split")


def resume_changes(saved: dict, cfg: Config, where: str) -> list[str]:
    """Checks the config stored in a checkpoint (`saved`) against the resuming `cfg`: raises ConfigError
    where resuming cannot work (another model or dataset); returns the other changed keys as
    "key: old -> new" (the caller says so in one line)."""
    now = to_dict(cfg)
    for section in _SHAPE_SECTIONS:
        old = saved.get(section, {})
        diff = {k: (old.get(k), now[section][k]) for k in now[section] if old.get(k) != now[section][k]}
        if diff:
            raise ConfigError(f"{where} holds a run whose {section} config differs from this one "
                              f"(saved vs. now: {diff}); use a new --workdir or the saved config")
    data = saved.get("data", {})
    for key in _DATA_IDENTITY:
        if data.get(key) != now["data"][key]:
            raise ConfigError(f"{where} was trained with data.{key}={data.get(key)!r}, not {now['data'][key]!r}: "
                              f"its data-iterator state belongs to that dataset, so resuming would not continue "
                              f"it; use a new --workdir (or data.{key}={data.get(key)!r})")
    changes = []
    for section in ("data", "optimizer", "training"):
        old = saved.get(section, {})
        for k, v in now[section].items():
            if f"{section}.{k}" not in _QUIET_KEYS and k in old and old[k] != v:
                changes.append(f"{section}.{k}: {old[k]!r} -> {v!r}")
    return changes


def _write_config_once(state: dict, ckpt: Checkpointer, cfg: Config, workdir: str, is_main: bool) -> None:
    """config.yaml (a copy for people; the checkpoint's own config is what resume checks) is written once
    a checkpoint of this run exists, so a run that dies before its first checkpoint leaves no config."""
    if state.get("written") or not is_main or "://" in workdir or not state.get("saved"):
        return
    if any(s in state["saved"] for s in ckpt.all_steps()):
        save_config(cfg, os.path.join(workdir, CONFIG_FILE))
        state["written"] = True


def _resume(ckpt: Checkpointer, cfg: Config, workdir: str, writer: MetricsWriter, graphdef: nnx.GraphDef,
            state: Any, shardings: Any, train_iter: Any) -> tuple[Any, int]:
    """(state, step) of the newest readable checkpoint, or (state, 0) when there is none. Steps it falls
    back over are moved aside by the Checkpointer and logged here (stdout and metrics.jsonl); a changed
    config is said in one line, or refused (`resume_changes`)."""
    if ckpt.latest_step() is None:
        return state, 0
    changes: list[str] = []

    def check(meta: dict) -> None:
        changes[:] = resume_changes(meta.get("config", {}), cfg, f"workdir {workdir!r}")

    try:
        state, data_state, _, start = restore_train_state(ckpt, graphdef, state, shardings, check_meta=check)
    finally:
        for s in ckpt.skipped:
            writer.write(s["step"], "checkpoint_fallback", s)
            print(f"checkpoint step {s['step']} is unreadable ({s['reason']}); moved it to {s['moved_to']}",
                  flush=True)
    if data_state is not None:
        try:
            train_iter.set_state(data_state)
        except Exception as err:  # noqa: BLE001 - e.g. another data.seq_len: the data order restarts
            changes.append(f"the saved data-iterator state does not fit this data config "
                           f"({type(err).__name__}), so the data order restarts")
    print(f"resumed from {ckpt.directory}/{start} (step {start})"
          + (f" after falling back over step(s) {[s['step'] for s in ckpt.skipped]}" if ckpt.skipped else ""),
          flush=True)
    if changes:
        print("resuming with a changed config (not an exact continuation): " + "; ".join(changes), flush=True)
    return state, start


def _stop_if_nonfinite(pending: list[tuple[int, dict[str, jax.Array]]], limit: int, lr: float,
                       flush: Any, block: bool) -> None:
    """Raises TrainingError (after writing every pending metric row) once `limit` updates in a row were
    skipped for NaN/Inf. Reads the optimiser's device-side counter of the newest step when `block` (the
    loop is about to sync anyway), else of the newest step already computed, without waiting."""
    for s, m in reversed(pending[-2:] if not block else pending[-1:]):
        counter = m["nonfinite_in_row"]
        if not block and not counter.is_ready():
            continue
        n = int(counter)
        if n >= limit:
            flush()
            first = s + 2 - n
            raise TrainingError(
                f"loss or gradients were NaN/Inf for {n} steps in a row (steps {first} to {s + 1}); those updates "
                f"were skipped and the run stopped before any checkpoint or eval of them. Lower optimizer.lr "
                f"(now {lr}), enable clipping, or raise training.max_nonfinite_in_row (now {limit}).")
        return


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
        if self.signal is None:
            self.signal = signum
        elif signum == signal.SIGINT:  # Ctrl-C twice: stop now (the CLI prints one line, exit 130)
            raise KeyboardInterrupt
        # A repeated SIGTERM (schedulers often send several) changes nothing: the checkpoint is coming.

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def run(cfg: Config, workdir: str, *, progress: bool = True) -> RunResult:
    """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns the final step's summary."""
    maybe_initialize_distributed()
    _ensure_workdir(workdir)
    is_main = jax.process_index() == 0
    mesh = make_mesh(cfg.mesh)
    t = cfg.training
    writer = MetricsWriter(workdir, enabled=is_main)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint, heal=True)
    config_written: dict[str, Any] = {"saved": set()}
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    byte_lengths = token_byte_lengths(tokenizer)
    schedule = lr_schedule(cfg.optimizer, t.steps)
    flops_per_token = model_flops_per_token(cfg)
    peak = t.peak_flops or measure_peak_flops()
    result = RunResult(step=0, status="finished", workdir=workdir)

    with jax.set_mesh(mesh), _Preemption() as preempt:
        graphdef, state, shardings = init_train_state(cfg, mesh)
        train_iter = make_train_iterator(cfg, mesh=mesh)
        state, start = _resume(ckpt, cfg, workdir, writer, graphdef, state, shardings, train_iter)
        result.step = start
        if start >= t.steps:
            print(f"nothing to train: {workdir} already holds step {start} >= training.steps={t.steps}; "
                  "raise training.steps to train further", flush=True)
            result.status = "nothing_to_train"

        step_fn = None
        pending: list[tuple[int, dict[str, jax.Array]]] = []
        window_start = time.perf_counter()
        bar = None
        if progress and is_main:
            from tqdm import tqdm
            bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True)

        def flush() -> None:
            nonlocal window_start
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
                result.train_loss = float(m["loss"])
            if bar is not None:
                bar.update(len(pending))
                bar.set_postfix(loss=f"{result.train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
            pending.clear()
            window_start = time.perf_counter()

        def run_eval(step: int) -> dict[str, float]:
            model, _ = nnx.merge(graphdef, state)
            out = evaluate_model(model, make_eval_iterator(cfg, mesh=mesh), t.eval_batches, byte_lengths)
            writer.write(step, "eval", out)
            if is_main:
                print(f"\nstep {step}: eval loss {out['loss']:.4f}  ppl {out['perplexity']:.2f}  "
                      f"bpb {out['bits_per_byte']:.4f}", flush=True)
            return out

        def run_diagnostics(step: int, batch: dict[str, jax.Array]) -> None:
            if cfg.residual.kind == "plain":
                return
            model, _ = nnx.merge(graphdef, state)
            tokens = batch["inputs"][:1]
            h_res = collect_h_res(model, tokens, engram_ids_BTEG=None if "engram_ids" not in batch
                                  else batch["engram_ids"][:1])
            gains = {k: np.asarray(v) for k, v in amax_gains(h_res).items()}
            writer.write(step, "diagnostics", {
                "composite_fwd_max": float(gains["composite_fwd"].max()),
                "composite_bwd_max": float(gains["composite_bwd"].max()),
                "layer_fwd_max": float(gains["per_layer_fwd"].max()),
                "layer_bwd_max": float(gains["per_layer_bwd"].max())})

        step = start
        profiler = StepProfiler(t.profile_steps, workdir, enabled=is_main and "://" not in workdir)
        try:
            for step in range(start, t.steps):
                profiler.before(step, state)
                batch = next(train_iter)
                if step_fn is None:
                    step_fn = make_sharded_step(graphdef, shardings, batch_shardings(batch, mesh), t.grad_accum)
                state, metrics = step_fn(state, batch)
                pending.append((step, metrics))
                done = step + 1
                last = done == t.steps
                diagnose = bool(t.diagnostics_every) and (done % t.diagnostics_every == 0 or last)
                evaluate = done % t.eval_every == 0 or last
                save = done % cfg.checkpoint.every == 0 or last or preempt.signal is not None
                # Waits for this step only where the loop syncs anyway (log, eval, checkpoint).
                _stop_if_nonfinite(pending, t.max_nonfinite_in_row, cfg.optimizer.lr, flush,
                                   block=done % t.log_every == 0 or diagnose or evaluate or save)
                if done % t.log_every == 0 or last or preempt.signal is not None:
                    flush()
                if diagnose:
                    run_diagnostics(done, batch)
                if evaluate:
                    result.eval = run_eval(done)
                if save:
                    ckpt.save(done, nnx.to_pure_dict(state), train_iter.get_state(),
                              {"step": done, "config": to_dict(cfg)}, force=True)
                    config_written["saved"].add(done)
                    _write_config_once(config_written, ckpt, cfg, workdir, is_main)
                result.step = done
                if preempt.signal is not None:
                    result.status = "preempted"
                    break
            flush()
        except BaseException:
            if pending:  # metric rows of computed steps are never dropped, whatever stopped the run
                try:
                    flush()
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            raise
        finally:
            profiler.stop(state)
            ckpt.close()
            _write_config_once(config_written, ckpt, cfg, workdir, is_main)
            if bar is not None:
                bar.close()

        if result.status == "finished" and is_main and t.sample_tokens > 0:
            model, _ = nnx.merge(graphdef, state)
            budget = cfg.model.max_seq_len - 2 - len(tokenizer.encode(t.sample_prompt))
            result.sample = t.sample_prompt + generate_text(
                model, tokenizer, t.sample_prompt, max(0, min(t.sample_tokens, budget)),
                temperature=0.8, top_k=40, seed=t.seed)
    writer.close()
    result.plots = finish_run(workdir, t.plots)
    if preempt.signal is not None:
        print(f"\nstopped by signal {preempt.signal} at step {result.step}; checkpoint saved in "
              f"{ckpt.directory}. Re-run the same command to resume.", flush=True)
    return result
