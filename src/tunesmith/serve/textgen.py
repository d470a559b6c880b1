"""From engine tokens to the text a client sees: incremental decoding and `stop` strings.

Decoding token by token with `decode([id])` breaks multi-byte characters and drops SentencePiece's
leading spaces; decoding the whole completion each time is quadratic. `IncrementalDecoder` decodes a
short window (the approach of TGI and vLLM): the text of the ids since the last emitted piece, minus
the text those ids had before the new one, held back while it ends in an incomplete character.

`TextStream` adds stop strings: text that could still be the start of a stop string is held back,
so a client never receives a piece it must later un-see; a match ends the stream, cut before it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REPLACEMENT = "\ufffd"  # what a byte-level tokenizer decodes half a UTF-8 character to


class IncrementalDecoder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # start of the window that gives the last emitted piece its context
        self._read = 0  # ids up to here have been turned into text

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> str:
        """The new text this token completes (often "" while a character is incomplete)."""
        self.ids.append(token)
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        if len(now) > len(before) and not now.endswith(REPLACEMENT):
            self._prefix, self._read = self._read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever text the last ids still hold (an incomplete character at the very end)."""
        before = self._decode(self.ids[self._prefix : self._read])
        now = self._decode(self.ids[self._prefix :])
        self._prefix = self._read = len(self.ids)
        return now[len(before) :]


@dataclass(frozen=True)
class Piece:
    """Text safe to send now; `stopped` when a stop string matched (the text ends before it)."""

    text: str
    stopped: bool = False


class TextStream:
    """Tokens in, client text out, with `stop` strings cut and never half-sent."""

    def __init__(self, tokenizer: Any, stop: list[str] | None = None) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        self.text = ""  # everything sent so far
        self._held = ""
        self.stopped = False

    def push(self, token: int) -> Piece:
        if self.stopped:
            return Piece("", stopped=True)
        return self._release(self.decoder.push(token))

    def finish(self) -> Piece:
        """At the end of generation: the held-back text, unless it completes a stop string."""
        if self.stopped:
            return Piece("", stopped=True)
        piece = self._release(self.decoder.flush())
        if piece.stopped:
            return piece
        rest, self._held = self._held, ""
        self.text += rest
        return Piece(piece.text + rest)

    def _release(self, new: str) -> Piece:
        pending = self._held + new
        cut = min((i for i in (pending.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            self.text += pending[:cut]
            return Piece(pending[:cut], stopped=True)
        keep = _longest_stop_prefix(pending, self.stop)
        ready, self._held = pending[: len(pending) - keep], pending[len(pending) - keep :]
        self.text += ready
        return Piece(ready)


def _longest_stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that some stop string starts with."""
    best = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-size:]):
                best = size
                break
    return best
