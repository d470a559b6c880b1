"""`tunesmith chat`: an interactive streaming chat, or one answer with --prompt."""

from __future__ import annotations

import sys

from tunesmith.infer.generate import generate_reply, stream_reply
from tunesmith.infer.loading import load_for_inference

HELP = "commands: /reset clears the history, /exit quits (Ctrl-D too)"


def run_chat(
    spec: str,
    prompt: str | None = None,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
) -> int:
    model, tokenizer = load_for_inference(spec)
    base: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    if prompt is not None:
        print(
            generate_reply(
                model, tokenizer, base + [{"role": "user", "content": prompt}], max_new_tokens, temperature
            )
        )
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
        for piece in stream_reply(model, tokenizer, history, max_new_tokens, temperature):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        print()
        history.append({"role": "assistant", "content": "".join(reply).strip()})
