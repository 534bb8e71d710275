"""The end-of-run and profiling hooks of the training loop, kept out of the loop itself.

`StepProfiler`: with `training.profile_steps=[first, last]` a `jax.profiler` trace of steps first..last
(1-based, inclusive, as logged) is written to `workdir/profile/` (TensorBoard's profile plugin or
https://ui.perfetto.dev open it). `finish_run`: PNG plots of the run's metrics (mhc_jax.plot).
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax

from mhc_jax.plot import plot_workdir

log = logging.getLogger(__name__)

PROFILE_DIR = "profile"


class StepProfiler:
    """`before(step)` before running the 0-based `step`; `stop(state)` ends an open trace (call it after the
    last step and in `finally`). Only process 0 traces, and only into a local workdir."""

    def __init__(self, steps: tuple[int, ...], workdir: str, enabled: bool = True):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.dir = os.path.join(workdir, PROFILE_DIR)
        self.enabled = bool(steps) and enabled
        self.active = False

    def before(self, step: int, state: Any = None) -> None:
        if not self.enabled:
            return
        done = step  # steps completed so far; the step about to run is `step + 1` in the logs
        if done + 1 == self.first and not self.active:
            jax.block_until_ready(state)  # earlier steps' work stays out of the trace
            jax.profiler.start_trace(self.dir)  # writes an .xplane.pb and a .trace.json.gz (Perfetto opens it)
            self.active = True
        elif done == self.last and self.active:
            self.stop(state)

    def stop(self, state: Any = None) -> None:
        if self.active:
            jax.block_until_ready(state)
            jax.profiler.stop_trace()
            self.active = False
            print(f"profile of steps {self.first}..{self.last}: {self.dir} (tensorboard --logdir {self.dir}, "
                  "or open the .trace.json.gz in Perfetto)", flush=True)


def finish_run(workdir: str, enabled: bool) -> list[str]:
    """The end-of-run plots (paths), or [] when disabled, not process 0, or the workdir is remote."""
    if not enabled or jax.process_index() != 0 or "://" in workdir:
        return []
    try:
        return plot_workdir(workdir)
    except Exception as err:  # noqa: BLE001 - a plotting failure must not fail a finished run
        log.warning("could not plot the metrics of %s: %s: %s", workdir, type(err).__name__, err)
        return []
