"""One HTTP request's choices, run on the engine and read from asyncio.

The engine calls back from its own thread; each callback hops onto the event loop with
`call_soon_threadsafe`, so a request waits on an `asyncio.Queue` without holding a thread. Text is
assembled here (`TextStream`), stop strings cancel their engine request, and a client that goes
away cancels every choice it was waiting for, so its rows leave the batch at the next step.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from tunesmith.serve.engine import FINISH_CANCELLED, FINISH_ERROR, Engine, Event, GenerationFailed, Handle
from tunesmith.serve.sampling import SamplingParams
from tunesmith.serve.textgen import TextStream

DISCONNECT_POLL_S = 0.5


class ClientGone(Exception):
    """The client disconnected; its generations were cancelled."""


@dataclass(frozen=True)
class TokenInfo:
    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...]


@dataclass
class Update:
    """New text of one choice; `finish` ("stop" or "length") on its last update."""

    index: int
    text: str
    tokens: list[TokenInfo]
    finish: str | None = None


@dataclass
class _Choice:
    stream: TextStream
    handle: Handle | None = None
    tokens: int = 0
    finish: str | None = None
    pending: list[TokenInfo] = field(default_factory=list)


async def _never_gone() -> bool:
    return False


class Run:
    """The choices of one request (n per prompt), started together on `engine`."""

    def __init__(self, engine: Engine, tokenizer: Any, stop: list[str], adapter: str | None) -> None:
        self.engine, self.tokenizer, self.stop, self.adapter = engine, tokenizer, stop, adapter
        self.choices: list[_Choice] = []
        self.started = time.monotonic()
        self.first_token_s: float | None = None
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

    @property
    def completion_tokens(self) -> int:
        return sum(choice.tokens for choice in self.choices)

    def start(self, jobs: list[tuple[list[int], SamplingParams]]) -> None:
        """Submit one engine request per (prompt, params); raises EngineBusy or ValueError untouched."""
        loop = asyncio.get_running_loop()
        try:
            for index, (prompt, params) in enumerate(jobs):
                choice = _Choice(TextStream(self.tokenizer, self.stop))
                self.choices.append(choice)

                def on_event(event: Event, index: int = index) -> None:
                    loop.call_soon_threadsafe(self._queue.put_nowait, (index, event))

                choice.handle = self.engine.submit(prompt, params, on_event, self.adapter)
        except Exception:
            self.cancel()
            raise

    def cancel(self) -> None:
        for choice in self.choices:
            if choice.handle is not None:
                choice.handle.cancel()

    async def updates(self, gone: Callable[[], Awaitable[bool]] = _never_gone) -> AsyncIterator[Update]:
        """Updates as they come, until every choice has finished; cancels everything if abandoned."""
        open_choices = len(self.choices)
        checked = time.monotonic()
        try:
            while open_choices:
                try:
                    index, event = await asyncio.wait_for(self._queue.get(), DISCONNECT_POLL_S)
                except asyncio.TimeoutError:  # noqa: UP041 (Python 3.10: not the builtin)
                    event = None
                if time.monotonic() - checked >= DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await gone():
                        raise ClientGone
                if event is None:
                    continue
                update = self._apply(index, event)
                if update is not None:
                    if update.finish is not None:
                        open_choices -= 1
                    yield update
        finally:
            self.cancel()  # no-op for finished choices; stops the rest when the reader went away

    def _apply(self, index: int, event: Event) -> Update | None:
        choice = self.choices[index]
        if choice.finish is not None:
            return None  # tokens the engine made before it saw a stop string's cancel
        text = ""
        if event.token is not None:
            if self.first_token_s is None:
                self.first_token_s = time.monotonic() - self.started
            choice.tokens += 1
            choice.pending.append(TokenInfo(event.token, event.logprob, event.top))
            piece = choice.stream.push(event.token)
            text = piece.text
            if piece.stopped:
                assert choice.handle is not None
                choice.handle.cancel()
                return self._close(index, choice, text, "stop")
        if event.finish in (FINISH_ERROR, FINISH_CANCELLED):
            raise GenerationFailed(event.error or "the server is shutting down")
        if event.finish is not None:
            tail = choice.stream.finish()
            return self._close(index, choice, text + tail.text, "stop" if tail.stopped else event.finish)
        if not text:
            return None
        tokens, choice.pending = choice.pending, []
        return Update(index, text, tokens)

    @staticmethod
    def _close(index: int, choice: _Choice, text: str, finish: str) -> Update:
        choice.finish = finish
        tokens, choice.pending = choice.pending, []
        return Update(index, text, tokens, finish)
