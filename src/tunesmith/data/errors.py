"""Errors and issues that point at a file and a row."""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.data.conversation import RowRef


class DataError(ValueError):
    """A data problem the user must fix; the message names the file, row and reason."""


@dataclass(frozen=True)
class RowIssue:
    """One bad row: where it is and what is wrong with it."""

    ref: RowRef
    reason: str

    def __str__(self) -> str:
        return f"{self.ref}: {self.reason}"
