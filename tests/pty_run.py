"""Run a command in a pseudo-terminal, as a user's shell would, and read back what reached the screen."""

from __future__ import annotations

import fcntl
import os
import re
import select
import struct
import subprocess
import termios
import time
from pathlib import Path

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

FOREIGN_BARS = ("it/s]", "s/it]", "Loading weights", "%|", "Writing model shards")
"""tqdm-style bars (transformers' weight loading, the GGUF reader, shard writing)."""
FOREIGN_WARNINGS = ("warning", "deprecat", "futurewarning", "warnings.warn")
"""Matched case-insensitively: library warnings and deprecation notices."""


def run_in_pty(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> tuple[int, str]:
    """Exit code and the raw bytes written to the terminal (stdout and stderr alike), decoded."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
    proc = subprocess.Popen(
        command, stdin=slave, stdout=slave, stderr=slave, cwd=cwd, env=env, close_fds=True
    )
    os.close(slave)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        else:
            proc.kill()
            raise AssertionError(f"{command} ran past {timeout} s")
    finally:
        os.close(master)
    return proc.wait(timeout=30), b"".join(chunks).decode("utf-8", "replace")


def screen_lines(raw: str) -> list[str]:
    """The lines as they end up on the screen: colours removed, each line's last redraw kept."""
    text = ANSI.sub("", raw)
    lines = []
    for line in text.replace("\r\n", "\n").split("\n"):
        shown = [part for part in line.split("\r") if part.strip()]
        if shown:
            lines.append(shown[-1])
    return lines


def noise_in(raw: str) -> list[str]:
    """Every foreign bar or warning marker found anywhere in the terminal output (redraws included)."""
    text = ANSI.sub("", raw)
    lowered = text.lower()
    return [m for m in FOREIGN_BARS if m in text] + [m for m in FOREIGN_WARNINGS if m in lowered]
