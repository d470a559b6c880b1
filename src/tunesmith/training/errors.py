"""Why a run stopped: errors the command line reports as one `error:` line, without a traceback."""

from __future__ import annotations


class TrainingDiverged(RuntimeError):
    """The numbers went bad (non-finite loss, gradients or weights, or a collapsed model)."""


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (in use, holds another run, unwritable, full)."""


class ResumeMismatch(RunDirError):
    """A resumed run's config or data differs from its checkpoint in a way resume cannot honour."""
