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

from mhc_jax.config import Config, load_config, save_config, to_dict
from mhc_jax.errors import ConfigError, TrainingError
from mhc_jax.data import load_tokenizer, make_eval_iterator, make_train_iterator
from mhc_jax.flops import model_flops_per_token
from mhc_jax.distributed import is_main_process, maybe_initialize_distributed, to_host
from mhc_jax.sharding import batch_shardings, batch_ways, make_mesh
from mhc_jax.train.checkpoint import Checkpointer
from mhc_jax.train.evaluation import evaluate_model, token_byte_lengths
from mhc_jax.train.metrics import MetricsWriter, peak_flops_per_device
from mhc_jax.train.optimizer import lr_schedule
from mhc_jax.train.state import CHECKPOINT_DIR, CONFIG_FILE, init_train_state, restore_train_state
from mhc_jax.train.step import make_sharded_step

log = logging.getLogger(__name__)

# Sections that must match between a checkpoint and the config resuming from it (the rest, e.g. steps
# or logging intervals, may change between runs).
_SHAPE_SECTIONS = ("model", "residual", "engram")
_DIAG_TOKENS = 128  # tokens per row the Amax-gain diagnostics look at


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
        probe = os.path.join(workdir, f".write_test.{jax.process_index()}")  # one per process: no races
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
    start: int = 0
    step_fn: Any = None
    pending: list[tuple[int, dict[str, jax.Array]]] = field(default_factory=list)
    nonfinite_run: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    bar: Any = None

    @property
    def is_main(self) -> bool:
        return is_main_process()


def _barrier(name: str) -> None:
    """Waits for every process (a no-op on one)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def build(cfg: Config, workdir: str) -> Session:
    """Workdir, mesh, sinks, tokenizer and a freshly initialised train state sharded on the mesh (call
    under `jax.set_mesh(session.mesh)` from here on)."""
    _ensure_workdir(workdir)
    _check_resumable(workdir, cfg)
    _barrier("mhc_jax:config-checked")  # every process read the saved config before process 0 rewrites it
    if is_main_process() and "://" not in workdir:
        save_config(cfg, os.path.join(workdir, CONFIG_FILE))
    mesh = make_mesh(cfg.mesh)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    with jax.set_mesh(mesh):
        graphdef, state, shardings = init_train_state(cfg, mesh)
        train_iter = make_train_iterator(cfg, mesh=mesh)
    return Session(
        cfg=cfg, workdir=workdir, mesh=mesh, writer=MetricsWriter(workdir, enabled=is_main_process()),
        ckpt=Checkpointer(os.path.join(workdir, CHECKPOINT_DIR), cfg.checkpoint), tokenizer=tokenizer,
        byte_lengths=token_byte_lengths(tokenizer), schedule=lr_schedule(cfg.optimizer, cfg.training.steps),
        flops_per_token=model_flops_per_token(cfg), peak=peak_flops_per_device(cfg.training.peak_flops),
        graphdef=graphdef, state=state, shardings=shardings, train_iter=train_iter,
        result=RunResult(step=0, status="finished", workdir=workdir))


def restore(s: Session) -> int:
    """Loads the newest readable checkpoint (state and data-iterator position), if any; returns the step."""
    t = s.cfg.training
    if s.ckpt.latest_step() is not None:
        s.state, data_state, _, s.start = restore_train_state(s.ckpt, s.graphdef, s.state, s.shardings)
        if data_state is not None:
            s.train_iter.set_state(data_state)
        if s.is_main:
            print(f"resumed from {s.ckpt.directory}/{s.start} (step {s.start})", flush=True)
    s.result.step = s.start
    if s.start >= t.steps and s.is_main:
        print(f"already trained to step {s.start} >= training.steps={t.steps}; nothing to do", flush=True)
    return s.start


def train_step(s: Session, step: int) -> dict[str, jax.Array]:
    """One optimisation step on the next batch (compiled on first use); queues its metrics for logging."""
    batch = next(s.train_iter)
    if s.step_fn is None:
        s.step_fn = make_sharded_step(s.graphdef, s.shardings, batch_shardings(batch, s.mesh))
    s.state, metrics = s.step_fn(s.state, batch)
    s.pending.append((step, metrics))
    return batch


def log_metrics(s: Session) -> None:
    """Writes the queued steps' metrics (process 0), updates the progress bar, and stops the run after
    `training.max_nonfinite_in_row` non-finite steps in a row (every process sees the same metrics)."""
    if not s.pending:
        return
    cfg, t = s.cfg, s.cfg.training
    host = jax.device_get([m for _, m in s.pending])  # scalars, replicated on every process
    step_time = (time.perf_counter() - s.window_start) / len(s.pending)
    tokens_per_s = 0.0
    for (step, _), m in zip(s.pending, host):
        tokens_per_s = float(m["tokens"]) / max(step_time, 1e-9)
        row = {"loss": m["loss"], "grad_norm": m["grad_norm"], "lr": float(s.schedule(step)),
               "tokens_per_s": tokens_per_s, "step_time": step_time,
               "mfu": s.flops_per_token * tokens_per_s / (s.peak * jax.device_count()),
               "nonfinite": bool(m["nonfinite"])}
        s.writer.write(step + 1, "train", row)
        s.nonfinite_run = s.nonfinite_run + 1 if m["nonfinite"] else 0
        s.result.train_loss = float(m["loss"])
        if s.nonfinite_run >= t.max_nonfinite_in_row:
            raise TrainingError(
                f"loss or gradients were NaN/Inf for {s.nonfinite_run} steps in a row (up to step {step + 1}); "
                f"those updates were skipped. Lower optimizer.lr (now {cfg.optimizer.lr}), enable "
                f"clipping, or raise training.max_nonfinite_in_row (now {t.max_nonfinite_in_row}).")
    if s.bar is not None:
        s.bar.update(len(s.pending))
        s.bar.set_postfix(loss=f"{s.result.train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")
    s.pending.clear()
    s.window_start = time.perf_counter()


def evaluate(s: Session, step: int) -> dict[str, float]:
    """Eval loss / perplexity / bits per byte over `training.eval_batches` batches (every process runs
    the jitted reduction; process 0 writes and prints)."""
    model, _ = nnx.merge(s.graphdef, s.state)
    out = evaluate_model(model, make_eval_iterator(s.cfg, mesh=s.mesh), s.cfg.training.eval_batches,
                         s.byte_lengths)
    s.writer.write(step, "eval", out)
    if s.is_main:
        print(f"\nstep {step}: eval loss {out['loss']:.4f}  ppl {out['perplexity']:.2f}  "
              f"bpb {out['bits_per_byte']:.4f}", flush=True)
    return out


def diagnose(s: Session, step: int, batch: dict[str, jax.Array]) -> None:
    """mHC / HC composite Amax gains (a no-op for the plain residual) over the first `_DIAG_TOKENS` tokens
    of one row per batch shard: rows that split evenly over the batch axes (a single row would not, and
    the partitioner would replicate it), few enough to gather on one host."""
    if s.cfg.residual.kind == "plain":
        return
    if s.cfg.model.scan_layers:  # the mappings are sown per connection; a scan body's sows do not escape
        log.warning("training.diagnostics_every needs model.scan_layers=false; skipping the Amax gains")
        return
    from mhc_jax.diagnostics import amax_gains, collect_h_res
    model, _ = nnx.merge(s.graphdef, s.state)
    rows, T = batch_ways(s.mesh), min(_DIAG_TOKENS, batch["inputs"].shape[1])  # causal: a prefix is exact
    part = {k: v[:rows, :T] for k, v in batch.items()}
    h_res = collect_h_res(model, part["inputs"], positions_BT=part["positions"],
                          segment_ids_BT=part["segment_ids"], engram_ids_BTLk=part.get("engram_ids"))
    gains = amax_gains(to_host(h_res))  # gathered: on a pod no process holds all of it
    s.writer.write(step, "diagnostics", {
        "composite_fwd_max": float(gains["composite_fwd"].max()),
        "composite_bwd_max": float(gains["composite_bwd"].max()),
        "layer_fwd_max": float(gains["per_layer_fwd"].max()),
        "layer_bwd_max": float(gains["per_layer_bwd"].max())})


def save_checkpoint(s: Session, step: int) -> None:
    """Orbax checkpoint of state, data-iterator position and metadata; every process takes part (each
    writes its shards; Orbax writes the metadata once)."""
    s.ckpt.save(step, nnx.to_pure_dict(s.state), s.train_iter.get_state(),
                {"step": step, "config": to_dict(s.cfg)}, force=True)


def sample(s: Session) -> str:
    """The end-of-run text sample. Every process runs the same generation (the parameters are sharded over
    all of them), so every process returns the same text."""
    from mhc_jax.generate import generate_text
    t = s.cfg.training
    model, _ = nnx.merge(s.graphdef, s.state)
    budget = s.cfg.model.max_seq_len - 2 - len(s.tokenizer.encode(t.sample_prompt))
    return t.sample_prompt + generate_text(model, s.tokenizer, t.sample_prompt, max(0, min(t.sample_tokens, budget)),
                                           temperature=0.8, top_k=40, seed=t.seed)


def _stop_requested(preempt: _Preemption, done: int, log_every: int) -> bool:
    """Whether to save and stop after step `done`. On several processes all must agree (one may be
    signalled before the others), so the flags are combined every `training.log_every` steps."""
    if jax.process_count() == 1:
        return preempt.signal is not None
    if done % log_every:
        return False
    from jax.experimental import multihost_utils
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
                if done % t.log_every == 0 or last or stop:
                    log_metrics(s)
                if t.diagnostics_every and (done % t.diagnostics_every == 0 or last):
                    diagnose(s, done, batch)
                if done % t.eval_every == 0 or last:
                    s.result.eval = evaluate(s, done)
                if done % cfg.checkpoint.every == 0 or last or stop:
                    save_checkpoint(s, done)
                s.result.step = done
                if stop:
                    s.result.status = "preempted"
                    break
            log_metrics(s)
        finally:
            s.ckpt.close()
            if s.bar is not None:
                s.bar.close()
        if s.result.status == "finished" and t.sample_tokens > 0 and start < t.steps:
            s.result.sample = sample(s)
    s.writer.close()
    if s.result.status == "preempted" and s.is_main:
        print(f"\nstopped by signal {preempt.signal or 'on another process'} at step {s.result.step}; checkpoint saved in "
              f"{s.ckpt.directory}. Re-run the same command to resume.", flush=True)
    return s.result
