"""Error types of the data pipeline."""

from __future__ import annotations


class DataError(RuntimeError):
    """Training data that cannot be used: too many bad videos, a list file or folder that cannot be
    read, a dataset too small for one batch. The message names the files and what is wrong."""


class ListFileError(DataError):
    """A list file (or scanned folder) that cannot be used; names the file and the line number."""


class VideoReadError(Exception):
    """One video that cannot be used; ``reason`` is a short human-readable cause. Caught by the
    loader, which skips the file (it never reaches the training loop)."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason
