"""Progress display: a rich bar in a terminal, a few plain lines elsewhere (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any


class ProgressReporter:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.total, self.enabled = total_steps, enabled
        self.interactive = enabled and sys.stdout.isatty()
        self._last_plain = 0.0
        self._progress: Any = None
        if self.interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("[bold]step {task.completed}/{task.total}"),
                BarColumn(),
                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=start_step, loss="-", lr="-", tps="-"
            )
            self._progress.start()

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        loss, lr, tps = f"{row['loss']:.4f}", f"{row['lr']:.2e}", f"{row['tokens_per_s']:.0f}"
        if self._progress is not None:
            self._progress.update(self._task, completed=row["step"], loss=loss, lr=lr, tps=tps)
            return
        now = time.monotonic()
        if now - self._last_plain >= 10 or row["step"] in (1, self.total):
            self._last_plain = now
            print(f"step {row['step']}/{self.total}  loss {loss}  lr {lr}  {tps} tok/s", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
