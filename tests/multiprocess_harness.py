"""Launching a command on several processes joined over localhost (gloo), each with its own fake CPU
devices: shared by the multi-process tests (tests/test_multiprocess.py and the Engram multi-host tests)."""

from __future__ import annotations

import os
import socket
import subprocess

from conftest import REPO_ROOT

N_PROCESSES, LOCAL_DEVICES = 2, 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env(cache_dir: str = "", xla_flags: str = "") -> dict[str, str]:
    """The environment of one process: LOCAL_DEVICES fake CPU devices (plus `xla_flags`), this checkout first
    on PYTHONPATH, no launch variables (the launch flags are passed), and `cache_dir` as the persistent
    compilation cache."""
    flags = f"--xla_force_host_platform_device_count={LOCAL_DEVICES} {xla_flags}".strip()
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu",
               PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # The persistent compilation cache, one directory per process. JAX writes entries from process 0 only,
    # and a CPU program's cache key differs per process, so only process 0's later launches reuse programs:
    # process 1 compiles every program in every launch, and process 0 waits for it at the first collective
    # (gloo creates its context within a 30 s key-value timeout: keep each compile well under that).
    if cache_dir:
        env.update(JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    for name in ("MHC_JAX_COORDINATOR", "MHC_JAX_NUM_PROCESSES", "MHC_JAX_PROCESS_ID", "MHC_JAX_DISTRIBUTED"):
        env.pop(name, None)
    return env


def spawn(cmd: list[str], out_dir, tag: str, xla_flags: str = "") -> list[tuple[subprocess.Popen, str]]:
    """Starts `cmd` on N_PROCESSES processes joined at a fresh localhost port; stdout+stderr to files."""
    port = free_port()
    procs = []
    for i in range(N_PROCESSES):
        log_path = os.path.join(out_dir, f"{tag}.{i}.log")
        launch = ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(N_PROCESSES), "--process-id", str(i)]
        with open(log_path, "w") as log:
            procs.append((subprocess.Popen(cmd + launch, stdout=log, stderr=subprocess.STDOUT,
                                           env=env(os.path.join(out_dir, f"jax-cache-{i}"), xla_flags),
                                           cwd=REPO_ROOT), log_path))
    return procs


def wait(procs, timeout: float = 900) -> list[str]:
    outs = []
    for proc, log_path in procs:
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            for p, _ in procs:
                p.kill()
            raise
        with open(log_path) as f:
            outs.append(f.read())
        assert proc.returncode == 0, f"{log_path} exited {proc.returncode}:\n{outs[-1][-4000:]}"
    return outs
