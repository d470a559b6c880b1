"""tunesmith: fine-tune language models from one typed config."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def train(*args: Any, **kwargs: Any) -> Any:
    """Train from a YAML path, dict or RunConfig; returns the run directory (see tunesmith.api.train)."""
    from tunesmith.api import train as _train

    return _train(*args, **kwargs)


def score(*args: Any, **kwargs: Any) -> Any:
    """Score a response with a finished reward run: `score(run_dir, prompt, response)`, or
    `score(run_dir, rows=[...])` (see tunesmith.scoring.score; imported on first use)."""
    from tunesmith.scoring import score as _score

    return _score(*args, **kwargs)


__all__ = ["__version__", "score", "train"]
