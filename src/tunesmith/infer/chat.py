"""`tunesmith chat`: an interactive streaming chat, or one answer with --prompt.

Replies come from the serve engine (`serve.local`), so the terminal samples, stops (eos and the
template's end-of-turn token) and detokenizes exactly as `tunesmith serve` does.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

from tunesmith.infer.loading import load_for_inference

HELP = "commands: /reset clears the history, /exit quits (Ctrl-D too)"
TOP_P = 0.95  # nucleus used when sampling (temperature > 0)


class ContextFull(ValueError):
    """The conversation leaves no room in the model's context for a reply."""


class ChatSession:
    """One model behind the serve engine, answering whole conversations."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        from tunesmith.serve.engine import Engine
        from tunesmith.serve.stops import reply_stop_ids

        self.tokenizer = tokenizer
        self.context = _context_length(model)
        self.engine = Engine(model, max_context=self.context, max_batch=1)
        self.stop_ids = reply_stop_ids(model, tokenizer)
        # A PeftModel answers with its adapter; the engine's None would mean the bare base.
        self.adapter = getattr(model, "active_adapter", None) if getattr(model, "peft_config", None) else None

    def prompt(self, messages: list[dict[str, str]]) -> list[int]:
        from tunesmith.infer.generate import prompt_ids

        return prompt_ids(self.tokenizer, messages)[0].tolist()

    def stream(
        self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float
    ) -> Iterator[str]:
        from tunesmith.serve.local import stream_text
        from tunesmith.serve.sampling import SamplingParams

        prompt = self.prompt(messages)
        room = self.context - len(prompt)
        if room < 1:
            raise ContextFull(
                f"the conversation ({len(prompt)} tokens) fills the model's context of {self.context} "
                "tokens; /reset the history"
            )
        params = SamplingParams(
            max_tokens=min(max_new_tokens, room),
            temperature=temperature,
            top_p=TOP_P if temperature > 0 else 1.0,
            stop_token_ids=self.stop_ids,
        )
        yield from stream_text(self.engine, self.tokenizer, prompt, params, adapter=self.adapter)

    def reply(self, messages: list[dict[str, str]], max_new_tokens: int, temperature: float) -> str:
        return "".join(self.stream(messages, max_new_tokens, temperature)).strip()

    def close(self) -> None:
        self.engine.close()


def _context_length(model: Any) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def run_chat(
    spec: str,
    prompt: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> int:
    model, tokenizer = load_for_inference(spec)
    session = ChatSession(model, tokenizer)
    try:
        return _converse(session, spec, prompt, system, max_new_tokens, temperature)
    finally:
        session.close()


def _converse(
    session: ChatSession,
    spec: str,
    prompt: str | None,
    system: str | None,
    max_new_tokens: int,
    temperature: float,
) -> int:
    base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        try:
            print(session.reply(base + [{"role": "user", "content": prompt}], max_new_tokens, temperature))
        except ContextFull as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    print(f"chatting with {spec}; {HELP}")
    history = list(base)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            history = list(base)
            continue
        history.append({"role": "user", "content": line})
        sys.stdout.write("assistant> ")
        reply = []
        try:
            for piece in session.stream(history, max_new_tokens, temperature):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ContextFull as exc:
            print(f"\nerror: {exc}")
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
