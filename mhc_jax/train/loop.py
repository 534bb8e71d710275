"""`run(cfg, workdir)`: the training loop behind train.py.

Data flows one way: config -> Grain batches (global arrays on the mesh) -> the jitted sharded step ->
metrics, and every `checkpoint.every` steps an Orbax checkpoint of model, optimiser, step, data-iterator
state and config. Re-running with the same workdir resumes from the newest readable checkpoint; SIGTERM or
SIGINT saves a checkpoint before exiting.

`run` is a sequence of named steps over one `Session`: `build` (mesh, state, data, sinks), `restore`,
then per step `train_step`, `log_metrics`, `diagnose`, `evaluate`, `save_checkpoint`, and at the end
`sample`. Multi-process: every process runs every step (each program is SPMD over the global mesh);
process 0 alone prints and writes metrics / TensorBoard; Orbax checkpoints with every process taking part.
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
from jax.experimental import multihost_utils

from mhc_jax.config import Config, save_config, to_dict
from mhc_jax.data.pipeline import load_tokenizer, make_eval_iterator, make_train_iterator
from mhc_jax.diagnostics import amax_gains, collect_h_res, engram_gate_stats
from mhc_jax.distributed import is_main_process, maybe_initialize_distributed, to_host
from mhc_jax.errors import ConfigError, TrainingError
from mhc_jax.flops import model_flops_per_token
from mhc_jax.sampling import generate_text
from mhc_jax.sharding import batch_shardings, batch_ways, make_mesh
from mhc_jax.train import sparse_rows
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.evaluation import evaluate_model, token_byte_lengths
from mhc_jax.model.moe import moe_blocks
from mhc_jax.train.metrics import MetricsWriter, moe_metrics, peak_flops_per_device
from mhc_jax.train.optimizer import lr_schedule
from mhc_jax.train.profile import StepProfiler, finish_run
from mhc_jax.train.state import (CHECKPOINT_DIR, CONFIG_FILE, abstract_train_state, init_train_state,
                                 restore_train_state)
from mhc_jax.train.step import make_sharded_step

log = logging.getLogger(__name__)

# Sections that must match between a checkpoint and the config resuming from it (the rest, e.g. steps
# or logging intervals, may change between runs).
_SHAPE_SECTIONS = ("model", "residual", "engram")
_DIAG_TOKENS = 128  # tokens per row the Amax-gain diagnostics look at


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
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")  # one per process: no races
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


_LAYOUTS = {True: "scanned (model.scan_layers=true: each run of identical blocks stacked under "
                  "blocks/<group>/layers/... with a leading layer axis)",
            False: "unscanned (model.scan_layers=false: one parameter set per block under blocks/<i>/...)"}


def resume_changes(saved: dict, cfg: Config, where: str) -> list[str]:
    """Checks the config stored in a checkpoint (`saved`) against the resuming `cfg`: raises ConfigError
    where resuming cannot work (another model or dataset); returns the other changed keys as
    "key: old -> new" (the caller says so in one line)."""
    now = to_dict(cfg)
    for section in _SHAPE_SECTIONS:
        old = saved.get(section, {})
        diff = {k: (old.get(k), now[section][k]) for k in now[section] if old.get(k) != now[section][k]}
        if section == "model" and "scan_layers" in diff:
            saved_scan = bool(diff["scan_layers"][0])
            raise ConfigError(f"{where} holds a checkpoint in the {_LAYOUTS[saved_scan]} layout, and this run "
                              f"builds the {_LAYOUTS[not saved_scan]} layout; resume with "
                              f"model.scan_layers={str(saved_scan).lower()} (the layouts hold the same values)")
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
            state: Any, shardings: Any, train_iter: Any, host_target: Any = None) -> tuple[Any, int]:
    """(state, step) of the newest readable checkpoint, or (state, 0) when there is none. Steps it falls
    back over are moved aside by the Checkpointer and logged here (stdout and metrics.jsonl); a changed
    config is said in one line, or refused (`resume_changes`)."""
    if ckpt.latest_step() is None:
        return state, 0
    changes: list[str] = []

    def check(meta: dict) -> None:
        changes[:] = resume_changes(meta.get("config", {}), cfg, f"workdir {workdir!r}")

    try:
        state, data_state, _, start = restore_train_state(ckpt, graphdef, state, shardings, check_meta=check,
                                                          host_target=host_target)
    finally:
        for s in ckpt.skipped:
            writer.write(s["step"], "checkpoint_fallback", s)
            if is_main_process():
                print(f"checkpoint step {s['step']} is unreadable ({s['reason']}); moved it to {s['moved_to']}",
                      flush=True)
    if data_state is not None:
        try:
            train_iter.set_state(data_state)
        except Exception as err:  # noqa: BLE001 - e.g. another data.seq_len: the data order restarts
            changes.append(f"the saved data-iterator state does not fit this data config "
                           f"({type(err).__name__}), so the data order restarts")
    if not is_main_process():  # every process restored the same step; process 0 says so
        return state, start
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


@dataclass
class Session:
    """Everything one training run holds; the named steps below read and update it."""

    cfg: Config
    workdir: str
    mesh: jax.sharding.Mesh
    writer: MetricsWriter
    ckpt: Checkpointer
    tokenizer: Any
    byte_lengths: np.ndarray
    schedule: Any
    flops_per_token: float
    peak: float
    graphdef: Any
    state: Any
    shardings: Any
    train_iter: Any
    result: RunResult
    tables: Any = None  # engram.update=sparse: the host tables (mhc_jax.engram.host_tables)
    rows: Any = None  # ... and the prefetcher of each batch's rows, which is also the train iterator
    profiler: Any = None
    start: int = 0
    step_fn: Any = None
    pending: list[tuple[int, dict[str, jax.Array]]] = field(default_factory=list)
    config_written: dict[str, Any] = field(default_factory=lambda: {"saved": set()})
    window_start: float = field(default_factory=time.perf_counter)
    bar: Any = None

    @property
    def is_main(self) -> bool:
        return is_main_process()


def build(cfg: Config, workdir: str) -> Session:
    """Workdir, mesh, sinks, tokenizer, the train state sharded on the mesh and the data iterator (call
    under `jax.set_mesh(session.mesh)` from here on). The state is freshly initialised, or only its shapes
    when the workdir holds a checkpoint (`restore` reads it; a run resuming a large model initialises
    nothing it would overwrite). config.yaml is written later, once the run has a checkpoint
    (`_write_config_once`)."""
    _ensure_workdir(workdir)
    mesh = make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    ckpt = Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint, heal=True)
    tables = rows = None
    with jax.set_mesh(mesh):
        make_state = init_train_state if ckpt.latest_step() is None else abstract_train_state
        graphdef, state, shardings = make_state(cfg, mesh)
        if cfg.engram.sparse:  # host tables and the prefetcher of their rows (train/sparse_rows)
            tables = sparse_rows.host_tables(cfg)
            if jax.process_count() > 1:  # each process holds its own row range of every table
                print(f"process {jax.process_index()}: Engram host tables hold rows "
                      + ", ".join(f"[{lo}, {hi})" for lo, hi in zip(tables.lo, tables.hi))
                      + f" of {tables.n_rows} ({tables.nbytes} bytes with moments)", flush=True)
            rows = train_iter = sparse_rows.row_prefetcher(cfg, mesh, make_train_iterator(cfg), tables)
        else:
            train_iter = make_train_iterator(cfg, mesh=mesh)
    return Session(
        cfg=cfg, workdir=workdir, mesh=mesh, writer=MetricsWriter(workdir, enabled=is_main_process()),
        ckpt=ckpt, tokenizer=tokenizer,
        byte_lengths=token_byte_lengths(tokenizer), schedule=lr_schedule(cfg.optimizer, cfg.training.steps),
        flops_per_token=model_flops_per_token(cfg), peak=peak_flops_per_device(cfg.training.peak_flops),
        graphdef=graphdef, state=state, shardings=shardings, train_iter=train_iter, tables=tables, rows=rows,
        profiler=StepProfiler(cfg.training.profile_steps, workdir,
                              enabled=is_main_process() and "://" not in workdir),
        result=RunResult(step=0, status="finished", workdir=workdir))


def restore(s: Session) -> int:
    """Loads the newest readable checkpoint (state, data-iterator position, sparse Engram tables), if any,
    falling back over unreadable steps (`_resume`); returns the step."""
    t = s.cfg.training
    host_target = None if s.tables is None else s.tables.state_dict()  # restored and verified with the step
    s.state, s.start = _resume(s.ckpt, s.cfg, s.workdir, s.writer, s.graphdef, s.state, s.shardings, s.train_iter,
                               host_target)
    if s.tables is not None and s.start:
        s.tables.load_state_dict(s.ckpt.host_state)
    s.result.step = s.start
    if s.start >= t.steps:
        if s.is_main:
            print(f"nothing to train: {s.workdir} already holds step {s.start} >= training.steps={t.steps}; "
                  "raise training.steps to train further", flush=True)
        s.result.status = "nothing_to_train"
    return s.start


def train_step(s: Session, step: int) -> dict[str, jax.Array]:
    """One optimisation step on the next batch (compiled on first use); queues its metrics for logging.
    With sparse Engram tables the batch's rows are then updated in host memory (row-wise Adam)."""
    s.profiler.before(step, s.state)
    batch = next(s.train_iter)
    if s.step_fn is None:
        s.step_fn = make_sharded_step(s.graphdef, s.shardings, batch_shardings(batch, s.mesh),
                                      s.cfg.training.grad_accum, platform=s.mesh.devices.flat[0].platform)
    s.state, metrics = s.step_fn(s.state, batch)
    if s.rows is not None:
        s.rows.apply(metrics)
    s.pending.append((step, metrics))
    return batch


def log_metrics(s: Session) -> None:
    """Writes the queued steps' metrics (process 0) and updates the progress bar. The non-finite stop is
    `_stop_if_nonfinite`, checked every step."""
    if not s.pending:
        return
    host = jax.device_get([m for _, m in s.pending])  # scalars, replicated on every process
    step_time = (time.perf_counter() - s.window_start) / len(s.pending)
    tokens_per_s = 0.0
    for (step, _), m in zip(s.pending, host):
        tokens_per_s = float(m["tokens"]) / max(step_time, 1e-9)
        row = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": float(s.schedule(step)),
               "tokens_per_s": tokens_per_s, "step_time": step_time,
               "mfu": s.flops_per_token * tokens_per_s / (s.peak * jax.device_count()),
               "nonfinite": bool(m["nonfinite"]), **moe_metrics(m, moe_blocks(s.cfg.model))}
        if "mtp_loss" in m:  # multi-token prediction (model.mtp_depth > 0)
            row["mtp_loss"] = m["mtp_loss"]
        s.writer.write(step + 1, "train", row)
        s.result.train_loss = float(m["loss"])
    if s.bar is not None:
        s.bar.update(len(s.pending))
        s.bar.set_postfix(loss=f"{s.result.train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
    s.pending.clear()
    s.window_start = time.perf_counter()


def evaluate(s: Session, step: int) -> dict[str, float]:
    """Eval loss / perplexity / bits per byte over `training.eval_batches` batches (every process runs
    the jitted reduction; process 0 writes and prints)."""
    model, _ = nnx.merge(s.graphdef, s.state)
    batches = (make_eval_iterator(s.cfg, mesh=s.mesh) if s.tables is None
               else sparse_rows.with_rows(s.cfg, s.mesh, s.tables, make_eval_iterator(s.cfg)))
    out = evaluate_model(model, batches, s.cfg.training.eval_batches, s.byte_lengths)
    s.writer.write(step, "eval", out)
    if s.is_main:
        print(f"\nstep {step}: eval loss {out['loss']:.4f}  ppl {out['perplexity']:.2f}  "
              f"bpb {out['bits_per_byte']:.4f}", flush=True)
    return out


def diagnose(s: Session, step: int, batch: dict[str, jax.Array]) -> None:
    """Engram gate statistics and table hit rates (with Engram), and the mHC / HC composite Amax gains (not
    for the plain residual) over the first `_DIAG_TOKENS` tokens of one row per batch shard: rows that split
    evenly over the batch axes (a single row would not, and the partitioner would replicate it), few enough
    to gather on one host."""
    model, _ = nnx.merge(s.graphdef, s.state)
    if s.cfg.engram.enabled:
        out = engram_gate_stats(model, batch)
        out.update(sparse_rows.stats(s.rows) if s.rows is not None else sparse_rows.dense_hit_stats(s.cfg, batch))
        s.writer.write(step, "diagnostics", out)
    if s.cfg.residual.kind == "plain":
        return
    rows, T = batch_ways(s.mesh), min(_DIAG_TOKENS, batch["inputs"].shape[1])  # causal: a prefix is exact
    part = {k: v[:rows, :T] for k, v in batch.items() if k != "engram_rows"}
    h_res = collect_h_res(model, part["inputs"], positions_BT=part["positions"],
                          segment_ids_BT=part["segment_ids"], engram_ids_BTEG=part.get("engram_ids"),
                          engram_rows_EUW=batch.get("engram_rows"))
    gains = amax_gains(to_host(h_res))  # gathered: on a pod no process holds all of it
    s.writer.write(step, "diagnostics", {
        "composite_fwd_max": float(gains["composite_fwd"].max()),
        "composite_bwd_max": float(gains["composite_bwd"].max()),
        "layer_fwd_max": float(gains["per_layer_fwd"].max()),
        "layer_bwd_max": float(gains["per_layer_bwd"].max())})


def save_checkpoint(s: Session, step: int) -> None:
    """Orbax checkpoint of state, data-iterator position, metadata (and sparse Engram tables); every process
    takes part (each writes its shards; Orbax writes the metadata once). config.yaml follows the first one."""
    host_state = None if s.tables is None else s.tables.state_dict(copy=s.cfg.checkpoint.async_save)
    s.ckpt.save(step, nnx.to_pure_dict(s.state), s.train_iter.get_state(),
                {"step": step, "config": to_dict(s.cfg)}, force=True, host_state=host_state)
    s.config_written["saved"].add(step)
    _write_config_once(s.config_written, s.ckpt, s.cfg, s.workdir, s.is_main)


def sample(s: Session) -> str:
    """The end-of-run text sample. Every process runs the same generation (the parameters are sharded over
    all of them), so every process returns the same text."""
    t = s.cfg.training
    model, _ = nnx.merge(s.graphdef, s.state)
    budget = s.cfg.model.max_seq_len - 2 - len(s.tokenizer.encode(t.sample_prompt))
    return t.sample_prompt + generate_text(model, s.tokenizer, t.sample_prompt, max(0, min(t.sample_tokens, budget)),
                                           temperature=0.8, top_k=40, seed=t.seed, engram_tables=s.tables)


def _stop_requested(preempt: _Preemption, done: int, log_every: int) -> bool:
    """Whether to save and stop after step `done`. On several processes all must agree (one may be
    signalled before the others), so the flags are combined every `training.log_every` steps."""
    if jax.process_count() == 1:
        return preempt.signal is not None
    if done % log_every:
        return False
    flags = multihost_utils.process_allgather(np.int32(preempt.signal is not None))
    return bool(np.any(flags))


def run(cfg: Config, workdir: str, *, progress: bool = True) -> RunResult:
    """Trains `cfg` in `workdir` (resuming if it holds a checkpoint); returns the final step's summary."""
    maybe_initialize_distributed()
    s = build(cfg, workdir)
    t = cfg.training
    with jax.set_mesh(s.mesh), _Preemption() as preempt:
        start = restore(s)
        if progress and s.is_main:
            from tqdm import tqdm
            s.bar = tqdm(total=t.steps, initial=start, unit="step", dynamic_ncols=True)
        s.window_start = time.perf_counter()
        try:
            for step in range(start, t.steps):
                batch = train_step(s, step)
                done = step + 1
                last = done == t.steps
                stop = _stop_requested(preempt, done, t.log_every)
                diagnose_now = bool(t.diagnostics_every) and (done % t.diagnostics_every == 0 or last)
                evaluate_now = done % t.eval_every == 0 or last
                save_now = done % cfg.checkpoint.every == 0 or last or stop
                # Waits for this step only where the loop syncs anyway (log, eval, checkpoint).
                _stop_if_nonfinite(s.pending, t.max_nonfinite_in_row, cfg.optimizer.lr, lambda: log_metrics(s),
                                   block=done % t.log_every == 0 or diagnose_now or evaluate_now or save_now)
                if done % t.log_every == 0 or last or stop:
                    log_metrics(s)
                if diagnose_now:
                    diagnose(s, done, batch)
                if evaluate_now:
                    s.result.eval = evaluate(s, done)
                if save_now:
                    save_checkpoint(s, done)
                if not s.pending and (diagnose_now or evaluate_now or save_now):
                    s.window_start = time.perf_counter()  # the next window times train steps, not this eval / save
                s.result.step = done
                if stop:
                    s.result.status = "preempted"
                    break
            log_metrics(s)
        except BaseException:
            if s.pending:  # metric rows of computed steps are never dropped, whatever stopped the run
                try:
                    log_metrics(s)
                except Exception:  # noqa: BLE001 - the original error is the one to report
                    pass
            raise
        finally:
            s.profiler.stop(s.state)
            s.ckpt.close()
            if s.rows is not None:
                s.rows.close()
            _write_config_once(s.config_written, s.ckpt, cfg, workdir, s.is_main)
            if s.bar is not None:
                s.bar.close()
        if s.result.status == "finished" and t.sample_tokens > 0:
            s.result.sample = sample(s)
    s.writer.close()
    if s.is_main:
        s.result.plots = finish_run(workdir, t.plots)
    if s.result.status == "preempted" and s.is_main:
        print(f"\nstopped by signal {preempt.signal or 'on another process'} at step {s.result.step}; checkpoint "
              f"saved in {s.ckpt.directory}. Re-run the same command to resume.", flush=True)
    return s.result
