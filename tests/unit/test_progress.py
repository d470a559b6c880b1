"""Phases and the step bar: plain lines off a terminal, nothing when hidden, text shown as it is."""

from __future__ import annotations

import io
import sys
import time

import pytest

from tunesmith.training import progress
from tunesmith.training.progress import ProgressReporter, phase, phases_shown, start_phase


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_a_long_phase_is_two_plain_lines(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_START_AFTER_S", 0.0)
    out = io.StringIO()
    with phase("loading model default", stream=out):
        time.sleep(0.2)
    first, second = out.getvalue().splitlines()
    assert first == "loading model default ..."
    assert second.startswith("loading model default: done in ") and second.endswith(" s")


def test_a_quick_phase_prints_its_end_only_and_a_failed_one_nothing():
    out = io.StringIO()
    with phase("preparing data", stream=out):
        pass
    assert [line.split(" in ")[0] for line in out.getvalue().splitlines()] == ["preparing data: done"]
    out = io.StringIO()
    with pytest.raises(ValueError), phase("converting m.gguf", stream=out):
        raise ValueError("not a GGUF file")
    assert out.getvalue() == ""  # the error that follows stands alone


def test_hidden_phases_print_nothing_and_open_ones_close_with_the_block():
    out = io.StringIO()
    with phases_shown(False), phase("loading model x", stream=out):
        pass
    assert out.getvalue() == ""
    terminal = _Terminal()
    with phases_shown(True):
        start_phase("converting m.gguf", stream=terminal)  # its code raised before done()
    assert "(stopped)" in terminal.getvalue()
    with phase("next", stream=io.StringIO()):  # a fresh display starts: none is left live
        pass


def test_messages_are_printed_as_written_not_as_markup(monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    reporter = ProgressReporter(3, 0)
    assert reporter.interactive
    reporter.message("Batch rows: data[0].jsonl:3 [bold]x[/]")
    reporter.close()
    assert "Batch rows: data[0].jsonl:3 [bold]x[/]" in terminal.getvalue()


def test_phase_steps_end_each_step_when_the_next_begins(monkeypatch):
    monkeypatch.setattr(progress, "PLAIN_START_AFTER_S", 0.0)
    out = io.StringIO()
    steps = progress.PhaseSteps(stream=out)
    steps("loading run")
    time.sleep(0.05)
    steps("writing out.gguf")
    time.sleep(0.05)
    steps.finish()
    lines = out.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines if ": done in " in line] == [
        "loading run",
        "writing out.gguf",
    ]
    first_done = next(i for i, line in enumerate(lines) if line.startswith("loading run: done in "))
    assert first_done < lines.index("writing out.gguf ...")


def test_a_failed_step_prints_no_done_line():
    out = io.StringIO()
    steps = progress.PhaseSteps(stream=out)
    steps("loading run")
    steps.finish(failed=True)
    assert "done" not in out.getvalue()
