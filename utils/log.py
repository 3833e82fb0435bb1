"""The project's log: ``logging`` under the ``mediscope`` logger, printed through tqdm.

Library code reports what is not a progress bar (epoch summaries, resumes, the dataset in use,
fitted temperatures) with ``log = get_logger(__name__)`` and ``log.info(...)``. Unless the
application configured the ``mediscope`` logger itself, the first :func:`get_logger` call
gives it one handler that writes ``message`` lines through ``tqdm.write`` (so they do not
break progress bars) to standard output, at INFO level; ``logging.getLogger("mediscope")
.setLevel(logging.WARNING)`` silences them, and any handler can be attached as usual.
"""
from __future__ import annotations

import logging
import sys

from tqdm.auto import tqdm

ROOT = "mediscope"


class TqdmHandler(logging.Handler):
    """Writes each record as one line through ``tqdm.write`` to standard output."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=sys.stdout)
        except Exception:  # noqa: BLE001 - logging's contract: report, never raise
            self.handleError(record)


def get_logger(name: str) -> logging.Logger:
    """``mediscope.<name>``; sets up the default handler on first use (module docstring)."""
    root = logging.getLogger(ROOT)
    if not root.handlers:
        handler = TqdmHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        root.addHandler(handler)
        root.setLevel(logging.INFO)
        root.propagate = False
    return logging.getLogger(f"{ROOT}.{name.removeprefix('utils.').removeprefix('models.')}")
