"""The one place where command-line entry points turn expected failures into one line.

Every CLI's `main(argv) -> int` is decorated with `@entry_point` (and its `__main__` calls
`exit_process(main())`): an `MhcJaxError` (bad config, bad data,
unreadable checkpoint, a run that cannot go on) prints `error: <message>` on stderr and returns 2, a full
disk prints the path and what to free, Ctrl-C returns 130; anything else is a bug and keeps its traceback.
Background threads' noise about an expected failure (Orbax's logged save error, asyncio's report of a
failed write task nobody awaited, TensorStore's posts to a closed event loop) is dropped, so the error line
stands alone.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence

from mhc_jax.errors import MhcJaxError, disk_full

Main = Callable[[Sequence[str] | None], int]


def error_line(err: BaseException) -> str | None:
    """The one-line message for an expected failure, or None for a bug (which keeps its traceback)."""
    if isinstance(err, MhcJaxError):
        return f"error: {err}"
    full = disk_full(err)
    if full is not None:
        where = f" writing {full.filename}" if full.filename else ""
        return (f"error: no space left on device{where}; free space there (or point --workdir / "
                f"data.data_dir at a larger disk) and re-run: the last good checkpoint is kept")
    return None


class _ExpectedFailureFilter(logging.Filter):
    """Drops log records that carry an expected failure's traceback (e.g. Orbax's background save thread
    logging a full disk): the main thread reports the same failure once, as one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return exc is None or error_line(exc) is None


def _is_closed_loop_noise(unraisable) -> bool:
    """True for asyncio's "Event loop is closed" raised in `call_soon_threadsafe`: after a failed async
    checkpoint save Orbax closes its event loop while TensorStore's writer threads still post their
    completions to it, and each post ends as an unraisable exception (0 to ~14 tracebacks per failure,
    measured) that says nothing the one error line does not."""
    exc = unraisable.exc_value
    if not isinstance(exc, RuntimeError) or str(exc) != "Event loop is closed":
        return False
    return any(frame.name == "call_soon_threadsafe" and os.path.basename(frame.filename) == "base_events.py"
               for frame in traceback.extract_tb(unraisable.exc_traceback))


def _install_unraisable_filter() -> None:
    """Routes unraisable exceptions past `_is_closed_loop_noise` (once per process); all others reach the
    hook that was installed before. It stays for the process: the posts come from background threads, also
    after `main` has returned."""
    previous = sys.unraisablehook
    if getattr(previous, "_mhc_jax_filter", False):
        return

    def hook(unraisable) -> None:
        if not _is_closed_loop_noise(unraisable):
            previous(unraisable)

    hook._mhc_jax_filter = True
    sys.unraisablehook = hook


def entry_point(main: Main) -> Main:
    """Decorates a CLI `main(argv) -> int` so that expected failures end as one line and exit 2."""

    @functools.wraps(main)
    def wrapped(argv: Sequence[str] | None = None) -> int:
        _install_unraisable_filter()
        quiet = _ExpectedFailureFilter()
        # A logger's filters see its own records, not its children's: asyncio's own logger reports a failed
        # Orbax write task nobody awaited ("Task exception was never retrieved", seen in CI on a full disk).
        loggers = [logging.getLogger(), logging.getLogger("absl"), logging.getLogger("asyncio")]
        for logger in loggers:
            logger.addFilter(quiet)
        try:
            return main(argv)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as err:  # noqa: BLE001 - re-raised below unless it is an expected failure
            line = error_line(err)
            if line is None:
                raise
            print(line, file=sys.stderr)
            return 2
        finally:
            for logger in loggers:
                logger.removeFilter(quiet)

    return wrapped


def exit_process(code: int) -> None:
    """`sys.exit` for a CLI's `__main__`. After an expected failure (exit 2) the process ends at once, so
    background threads the failure interrupted (Orbax's async save, TensorStore, Grain) add no shutdown
    tracebacks after the one error line; what they wrote is already committed or already reported."""
    if code == 2:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def write_json(path: str, result: dict) -> None:
    """A CLI's `--json PATH` output: `result` as indented JSON (nothing when `path` is empty)."""
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
