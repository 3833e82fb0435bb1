"""User-facing errors for bad input.

Every problem with a file or folder that a user handed us is raised as a ``DataError``
whose message is one line naming the path and the problem, so a notebook or CLI can
print it as is instead of a traceback from deep inside numpy or nibabel.
"""
from __future__ import annotations

from pathlib import Path


class DataError(ValueError):
    """A one-line problem with an input file or folder: ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = " ".join(str(problem).split())  # force a single line
        super().__init__(self.problem if path is None else f"{path}: {self.problem}")
