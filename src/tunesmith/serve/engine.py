"""The generation engine: one background thread owns the model and decodes every request together.

Continuous batching: requests wait in a queue; between decode steps the engine prefills newcomers
(each alone, so no padding enters a forward) and joins them to their batch, and drops rows that
finished or were cancelled. Each step is one forward over all active rows of a batch (see
`batch.py` for the left-padded cache layout that keeps a row's result equal to decoding it alone).
Rows of different adapters share a batch when PEFT can mix them (`routing.py`).

The engine speaks token ids only. Text (detokenizing, stop strings) is the caller's business
(`textgen.py`), so the HTTP server and `tunesmith chat` share this engine through `submit` (events
to a callback, from the engine thread), `stream` and `generate` (synchronous, for one caller).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tunesmith.serve.batch import DecodeBatch, cache_argument, prefill
from tunesmith.serve.routing import AdapterRouting
from tunesmith.serve.sampling import Sampled, SamplingParams, make_generator, sample_row

log = logging.getLogger(__name__)

FINISH_STOP, FINISH_LENGTH, FINISH_CANCELLED, FINISH_ERROR = "stop", "length", "cancelled", "error"


@dataclass(frozen=True)
class Event:
    """What a request hears from the engine: a token, the end (`finish`), or both in one event.

    A stop token (eos, end of turn) is not delivered as a token: it only ends the request.
    """

    token: int | None = None
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    finish: str | None = None
    error: str | None = None


class Handle:
    """The caller's side of a submitted request: cancel it (a client went away, a stop string matched)."""

    def __init__(self, on_event: Callable[[Event], None]) -> None:
        self.on_event = on_event
        self.cancelled = False  # set by the caller's thread, read by the engine's between steps

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Sequence:
    handle: Handle
    prompt: list[int]
    params: SamplingParams
    adapter: str | None
    generator: torch.Generator
    next_input: int = -1
    length: int = 0
    generated: int = 0
    done: bool = False


@dataclass
class Generation:
    """A finished request, from the synchronous API."""

    tokens: list[int] = field(default_factory=list)
    logprobs: list[float | None] = field(default_factory=list)
    finish: str = FINISH_LENGTH
    error: str | None = None


class GenerationFailed(RuntimeError):
    """The engine could not finish a request (an error in a forward, or the engine shutting down)."""


class EngineBusy(RuntimeError):
    """The waiting queue is full: the caller should answer 503 and let the client retry."""


class Engine:
    """Owns `model` on a background thread; thread-safe `submit` from any thread.

    max_batch: rows decoded at once, across all adapters. max_context: prompt + completion cap.
    max_waiting: queued requests beyond the batch before `submit` raises EngineBusy.
    prefill_budget: prompt tokens prefilled between two decode steps (at least one request), so a
    burst of long prompts delays the running streams by a bounded amount.
    mix_adapters: let rows of different adapters share a forward where PEFT allows it.
    """

    def __init__(
        self,
        model: Any,
        max_context: int,
        max_batch: int = 8,
        max_waiting: int = 256,
        prefill_budget: int = 2048,
        mix_adapters: bool = True,
    ) -> None:
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.max_context = max_context
        self.max_batch = max_batch
        self.max_waiting = max_waiting
        self.prefill_budget = prefill_budget
        self.routing = AdapterRouting(model, mix=mix_adapters)
        self.cache_arg = cache_argument(model)
        self._incoming: queue.Queue[_Sequence | None] = queue.Queue()
        self._waiting: deque[_Sequence] = deque()
        self._batches: dict[Hashable, DecodeBatch] = {}
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.peak_batch = 0  # the most rows one decode step has carried: evidence that batching happened
        self.steps = 0

    # -- the caller's side ------------------------------------------------------------------------

    def submit(
        self,
        prompt: list[int],
        params: SamplingParams,
        on_event: Callable[[Event], None],
        adapter: str | None = None,
    ) -> Handle:
        """Queue one request; `on_event` is called from the engine thread and must not block."""
        if not prompt:
            raise ValueError("the prompt is empty")
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {params.max_tokens}")
        if len(prompt) + params.max_tokens > self.max_context:
            raise ValueError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the "
                f"context of {self.max_context} tokens"
            )
        self.routing.check(adapter)
        if self._incoming.qsize() + len(self._waiting) >= self.max_waiting:
            raise EngineBusy(f"{self.max_waiting} requests are already waiting")
        handle = Handle(on_event)
        generator = make_generator(params.seed)
        self._ensure_started()
        self._incoming.put(_Sequence(handle, list(prompt), params, adapter, generator))
        return handle

    def stream(
        self, prompt: list[int], params: SamplingParams, adapter: str | None = None
    ) -> Iterator[Event]:
        """Events of one request, in the caller's thread; stopping the iteration cancels the request."""
        events: queue.Queue[Event] = queue.Queue()
        handle = self.submit(prompt, params, events.put, adapter)
        try:
            while True:
                event = events.get()
                yield event
                if event.finish is not None:
                    return
        finally:
            handle.cancel()

    def generate(self, prompt: list[int], params: SamplingParams, adapter: str | None = None) -> Generation:
        """Run one request to the end and return its tokens (the stop token excluded)."""
        result = Generation()
        for event in self.stream(prompt, params, adapter):
            if event.token is not None:
                result.tokens.append(event.token)
                result.logprobs.append(event.logprob)
            if event.finish is not None:
                result.finish, result.error = event.finish, event.error
        return result

    def close(self) -> None:
        """Stop the engine thread; requests still running end with finish `cancelled`."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._incoming.put(None)
        if thread is not None:
            thread.join(timeout=30)

    @property
    def active(self) -> int:
        """Rows decoding now (read from any thread: the tuple copy is taken without releasing the GIL)."""
        return sum(len(batch) for batch in tuple(self._batches.values()))

    # -- the engine thread ------------------------------------------------------------------------

    def _ensure_started(self) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("the engine is closed")
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="tunesmith-engine", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        with torch.inference_mode():
            while self._take_incoming(block=self.active == 0 and not self._waiting):
                try:
                    self._admit()
                    for key in list(self._batches):
                        self._step(key)
                except Exception as exc:  # a bug here must not strand every listener on a dead thread
                    log.exception("engine iteration failed")
                    self._end_all(FINISH_ERROR, f"generation failed: {exc}")
        self._end_all(FINISH_CANCELLED)

    def _end_all(self, reason: str, error: str | None = None) -> None:
        """Finish the running requests; on close also the waiting ones and any submitted meanwhile."""
        if self._closed:
            while True:
                try:
                    item = self._incoming.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    self._waiting.append(item)
            for sequence in self._waiting:
                self._finish(sequence, reason, error)
            self._waiting.clear()
        for batch in self._batches.values():
            for sequence in batch.rows:
                self._finish(sequence, reason, error)
        self._batches.clear()

    def _take_incoming(self, block: bool) -> bool:
        """Move submitted requests to the waiting line; False once the engine is closing."""
        try:
            item = self._incoming.get(block=block)
            while True:
                if item is None:
                    return False
                self._waiting.append(item)
                item = self._incoming.get_nowait()
        except queue.Empty:
            return not self._closed

    def _admit(self) -> None:
        budget = self.prefill_budget
        while self._waiting and self.active < self.max_batch:
            sequence = self._waiting[0]
            if sequence.handle.cancelled:
                self._waiting.popleft()
                self._finish(sequence, FINISH_CANCELLED)
                continue
            if budget < len(sequence.prompt) and budget < self.prefill_budget:
                return  # the rest waits one step, so running streams keep flowing
            self._waiting.popleft()
            budget -= len(sequence.prompt)
            self._start(sequence)

    def _start(self, sequence: _Sequence) -> None:
        try:
            with self.routing.forward([sequence.adapter]) as kwargs:
                cache, logits = prefill(self.model, sequence.prompt, self.device, self.cache_arg, **kwargs)
        except Exception as exc:  # this request's problem (e.g. out of memory), not the server's
            log.exception("prefill failed")
            self._finish(sequence, FINISH_ERROR, f"generation failed: {exc}")
            return
        sequence.length = len(sequence.prompt)
        if self._advance(sequence, logits):
            key = self.routing.group_of(sequence.adapter)
            self._batches.setdefault(key, DecodeBatch(self.device, self.cache_arg)).add(sequence, cache)

    def _step(self, key: Hashable) -> None:
        batch = self._batches[key]
        live = [i for i, row in enumerate(batch.rows) if not row.handle.cancelled]
        for row in batch.rows:
            if row.handle.cancelled:
                self._finish(row, FINISH_CANCELLED)
        batch.keep(live)
        if not batch:
            del self._batches[key]
            return
        try:
            with self.routing.forward([row.adapter for row in batch.rows]) as kwargs:
                logits = batch.step(self.model, **kwargs)
            self.steps += 1
            self.peak_batch = max(self.peak_batch, len(batch))
        except Exception as exc:
            log.exception("decode step failed")
            for row in batch.rows:
                self._finish(row, FINISH_ERROR, f"generation failed: {exc}")
            del self._batches[key]
            return
        keep = [i for i, row in enumerate(batch.rows) if self._advance(row, logits[i])]
        batch.keep(keep)
        if not batch:
            del self._batches[key]

    def _advance(self, sequence: _Sequence, logits: torch.Tensor) -> bool:
        """Sample this row's next token and deliver it; True while the request goes on."""
        try:
            sampled = sample_row(logits, sequence.params, sequence.generator)
        except Exception as exc:  # e.g. non-finite logits: multinomial refuses them
            log.exception("sampling failed")
            self._finish(sequence, FINISH_ERROR, f"sampling failed: {exc}")
            return False
        return self._deliver(sequence, sampled)

    def _deliver(self, sequence: _Sequence, sampled: Sampled) -> bool:
        """Hand one sampled token to its request; True while the request goes on."""
        if sampled.token in sequence.params.stop_token_ids:
            self._finish(sequence, FINISH_STOP)
            return False
        sequence.generated += 1
        sequence.next_input = sampled.token
        ended = sequence.generated >= sequence.params.max_tokens or sequence.length + 1 >= self.max_context
        self._emit(
            sequence,
            Event(sampled.token, sampled.logprob, sampled.top, FINISH_LENGTH if ended else None),
        )
        sequence.done = ended
        return not ended  # a cancelled row leaves at the start of the next step, with its final event

    def _finish(self, sequence: _Sequence, reason: str, error: str | None = None) -> None:
        if not sequence.done:
            sequence.done = True
            self._emit(sequence, Event(finish=reason, error=error))

    def _emit(self, sequence: _Sequence, event: Event) -> None:
        try:
            sequence.handle.on_event(event)
        except Exception:  # a caller whose event loop is gone: nobody is listening any more
            log.debug("dropping a request whose listener failed", exc_info=True)
            sequence.handle.cancel()
