"""Progress display: a rich bar in a terminal, a few plain lines elsewhere (logs, CI).

Two shapes, one style: `ProgressReporter` for the training steps (stdout; loss, lr, tok/s, ETA)
and `phase()` for every other long phase (model load, first GGUF conversion, data preparation,
evaluation, export; stderr, so that a command's own output on stdout stays clean when piped). In a
terminal a phase is a spinner line with the elapsed time that ends as `✓ TEXT  0:00:03`; elsewhere
it is `TEXT ...` once it has run for 2 s and `TEXT: done in 3.2 s` when it ends.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

PLAIN_START_AFTER_S = 2.0
"""Plain lines: a phase says it started only once it has run this long."""
PLAIN_EVERY_S = 10.0
"""Plain lines: at most one progress line per this many seconds (plus the first and the last)."""

_shown: contextvars.ContextVar[bool] = contextvars.ContextVar("tunesmith_phases_shown", default=True)
_live: list[Any] = []  # the rich Progress of the outermost phase that is running, if any


def _markup_free(text: str) -> Any:
    """Text that rich prints as it is: no markup parsing (a `[` in a path or row) and no highlighting."""
    from rich.text import Text

    return Text(text)


class ProgressReporter:
    def __init__(self, total_steps: int, start_step: int, enabled: bool = True) -> None:
        self.total, self.enabled = total_steps, enabled
        self.interactive = enabled and sys.stdout.isatty()
        self._last_plain = 0.0
        self._progress: Any = None
        if self.interactive:
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("{task.description}", style="bold", markup=False),
                BarColumn(),
                TextColumn("{task.fields[info]}", markup=False),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
            )
            self._task = self._progress.add_task(
                self._step_text(start_step),
                total=total_steps,
                completed=start_step,
                info=self._info("-", "-", "-"),
            )
            self._progress.start()

    def _step_text(self, step: int) -> str:
        return f"step {step}/{self.total}"

    @staticmethod
    def _info(loss: str, lr: str, tps: str) -> str:
        return f"loss {loss}  lr {lr}  {tps} tok/s"

    def update(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        loss, lr, tps = f"{row['loss']:.4f}", f"{row['lr']:.2e}", f"{row['tokens_per_s']:.0f}"
        if self._progress is not None:
            self._progress.update(
                self._task,
                completed=row["step"],
                description=self._step_text(row["step"]),
                info=self._info(loss, lr, tps),
            )
            return
        now = time.monotonic()
        if now - self._last_plain >= PLAIN_EVERY_S or row["step"] in (1, self.total):
            self._last_plain = now
            print(f"step {row['step']}/{self.total}  loss {loss}  lr {lr}  {tps} tok/s", flush=True)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None:
            self._progress.console.print(_markup_free(text))
        else:
            print(text, flush=True)

    @contextlib.contextmanager
    def phase(self, text: str, total: int | None = None) -> Iterator[PhaseHandle]:
        """A phase inside training (evaluation): a second line under the step bar, or plain lines."""
        if not self.enabled:
            yield PhaseHandle(None, None, text, total, None)
            return
        if self._progress is None:
            with phase(text, total=total, stream=sys.stdout) as handle:
                yield handle
            return
        task = self._progress.add_task(text, total=total, info=f"0/{total}" if total else "")
        handle = PhaseHandle(self._progress, task, text, total, None, counted_info=True)
        try:
            yield handle
        finally:
            self._progress.remove_task(task)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()


class PhaseHandle:
    """What a phase's body may report: how far it got (`advance`) once it knows its `total`."""

    def __init__(
        self,
        progress: Any,
        task: Any,
        text: str,
        total: int | None,
        stream: TextIO | None,
        counted_info: bool = False,
    ) -> None:
        self._progress, self._task, self.text, self.total, self._stream = progress, task, text, total, stream
        self._counted_info = counted_info  # the count goes into the `info` field (the training bar's columns)
        self.completed = 0
        self._last_plain = time.monotonic()

    def advance(self, count: int = 1) -> None:
        self.completed += count
        if self._progress is not None:
            extra = {"info": f"{self.completed}/{self.total}"} if self._counted_info and self.total else {}
            self._progress.update(self._task, completed=self.completed, **extra)
        elif self._stream is not None and self.total:
            now = time.monotonic()
            if now - self._last_plain >= PLAIN_EVERY_S:
                self._last_plain = now
                print(f"{self.text}: {self.completed}/{self.total}", file=self._stream, flush=True)


@contextlib.contextmanager
def phases_shown(shown: bool) -> Iterator[None]:
    """Show (or hide) the phases run inside this block, e.g. hidden for `train(show_progress=False)`.

    A phase still open when the block ends (its body raised before `done()`) is closed here, so the
    terminal is never left with a live spinner."""
    token = _shown.set(shown)
    try:
        yield
    finally:
        _shown.reset(token)
        for open_phase in list(_open):
            open_phase.done(failed=True)


_open: list[Phase] = []


class Phase:
    """One long phase on the screen from `start_phase()` to `done()`; see `phase()`."""

    def __init__(self, text: str, total: int | None, stream: TextIO | None) -> None:
        self.text, self.total = text, total
        self._out = stream or sys.stderr
        self._started = time.perf_counter()
        self._ended = False
        self.handle = PhaseHandle(None, None, text, total, None)
        if not _shown.get():
            self._ended = True
            return
        _open.append(self)
        if not _isatty(self._out):
            # The start line only for a phase still running after a moment: a quick one (or one that
            # fails at once, whose error should stand alone) prints at most its end line.
            self._announce = threading.Timer(PLAIN_START_AFTER_S, self._print_start)
            self._announce.daemon = True
            self._announce.start()
            self.handle = PhaseHandle(None, None, text, total, self._out)
            self._progress = None
            return
        self._outer = not _live
        if self._outer:
            _live.append(_phase_progress(self._out))
            _live[0].start()
        self._progress = _live[0]
        self._task = self._progress.add_task(text, total=total)
        self.handle = PhaseHandle(self._progress, self._task, text, total, None)

    def _print_start(self) -> None:
        print(f"{self.text} ...", file=self._out, flush=True)

    def done(self, failed: bool = False) -> None:
        if self._ended:
            return
        self._ended = True
        if self in _open:
            _open.remove(self)
        if self._progress is None:
            self._announce.cancel()
            if not failed:
                print(
                    f"{self.text}: done in {time.perf_counter() - self._started:.1f} s",
                    file=self._out,
                    flush=True,
                )
            return
        if failed:
            self._progress.update(self._task, description=f"{self.text} (stopped)")
        else:
            self._progress.update(self._task, total=self.total or 1, completed=self.total or 1)
        self._progress.stop_task(self._task)
        if self._outer:
            self._progress.stop()
            _live.clear()


def start_phase(text: str, total: int | None = None, stream: TextIO | None = None) -> Phase:
    """Open a phase now and close it with `.done()` (where a `with` block does not fit the code)."""
    return Phase(text, total, stream)


class PhaseSteps:
    """Phases named one after another by a `say(text)` callback (export's steps): each new step ends the
    one before it, so a function that only reports lines still shows spinners and elapsed times."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self._stream = stream
        self._current: Phase | None = None

    def __call__(self, text: str) -> None:
        self.finish()
        self._current = start_phase(text, stream=self._stream)

    def finish(self, failed: bool = False) -> None:
        if self._current is not None:
            self._current.done(failed=failed)
            self._current = None


@contextlib.contextmanager
def phase(text: str, total: int | None = None, stream: TextIO | None = None) -> Iterator[PhaseHandle]:
    """A long phase shown while it runs: a spinner (or a bar, given `total`) in a terminal, plain lines elsewhere.

    Phases may nest (a first GGUF conversion inside a model load): the inner one becomes a second
    line of the outer one's display.
    """
    opened = Phase(text, total, stream)
    try:
        yield opened.handle
    except BaseException:
        opened.done(failed=True)
        raise
    opened.done()


def _phase_progress(out: TextIO) -> Any:
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    class _BarWhenCounted(BarColumn):
        def render(self, task: Any) -> Any:
            return super().render(task) if task.total and task.total > 1 else ""

    class _CountWhenCounted(MofNCompleteColumn):
        def render(self, task: Any) -> Any:
            return super().render(task) if task.total and task.total > 1 else ""

    return Progress(
        SpinnerColumn(finished_text="[green]✓"),
        TextColumn("{task.description}", style="bold", markup=False),
        _BarWhenCounted(),
        _CountWhenCounted(),
        TimeElapsedColumn(),
        console=Console(file=out),
    )


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
