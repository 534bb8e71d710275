"""The project's one error family. Every expected failure (bad config, bad data, unreadable checkpoint, a
run that cannot go on) raises a subclass of `MhcJaxError`; the command-line entry points catch that base
once and print `error: <message>` without a traceback (exit 2). Anything else is a bug and keeps its
traceback."""

from __future__ import annotations

import errno


class MhcJaxError(Exception):
    """Base of every expected, user-facing failure; the message says what is wrong and what is allowed."""


class ConfigError(MhcJaxError, ValueError):
    """A config key, type or value that is not allowed; the message says which and what is allowed."""


class DataError(MhcJaxError, ValueError):
    """A dataset that cannot be read or gives no usable text; the message names the path or dataset."""


class CheckpointError(MhcJaxError, RuntimeError):
    """A checkpoint that cannot be written, read or matched to the run; the message names the path."""


class TrainingError(MhcJaxError, RuntimeError):
    """A run that cannot go on (e.g. non-finite losses in a row); the message says what to change."""


class NumericalError(MhcJaxError, ArithmeticError):
    """A numerical method that missed the accuracy asked for (e.g. integrated gradients' completeness);
    the message says what it reached and what to change."""


def disk_full(err: BaseException) -> OSError | None:
    """The ENOSPC / EDQUOT OSError behind `err` (itself or a cause or context of it), if any."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return err
        if "No space left on device" in str(err):  # tensorstore reports it as a plain status string
            return OSError(errno.ENOSPC, "No space left on device")
        err = err.__cause__ or err.__context__
    return None
