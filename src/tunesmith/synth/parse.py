"""Model output to questions and answers: repaired when the intent is unambiguous, else an error.

Each function returns `Parsed(value, repairs, error)`: `repairs` names what was fixed (counted in the
summary); `error` says why nothing usable came out (the pipeline retries, then skips the chunk).
"""

from __future__ import annotations

import contextlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from tunesmith.data.tokenize import strip_reasoning

_FENCE = re.compile(r"```(?:json|JSON)?\s*\n?(.*?)(?:```|$)", re.S)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.S)
_NUMBERED = re.compile(r"^\s*(?:\d+[.)]|[-*•])\s*(.+?)\s*$")
_QUESTION = re.compile(r"[^.?!:\n]*\?")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')
_THINK_INNER = re.compile(r"<think>(.*?)</think>", re.S)
_NUMBER = re.compile(r"(?<![\w.])(\d+(?:\.\d+)?)(?![\w.]*\d)")


@dataclass
class Parsed:
    value: Any = None
    repairs: list[str] = field(default_factory=list)
    error: str | None = None
    reasoning: str | None = None
    """The reasoning that came with an answer, when it was asked for."""


def _norm(s: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", s.lower()).split())


def _strip(text: str, repairs: list[str]) -> str:
    if "<think>" in text:
        text = _THINK.sub("", text)
        repairs.append("reasoning block removed")
    m = _FENCE.search(text)
    if m:
        repairs.append("code fence removed")
        text = m.group(1)
    return text.strip()


def _items(value: Any) -> list[Any] | None:
    if isinstance(value, dict):
        for key in ("questions", "items", "data"):
            if isinstance(value.get(key), list):
                return value[key]
        if isinstance(value.get("question"), str):
            return [value]
        return None
    return value if isinstance(value, list) else None


def _question_text(item: Any) -> str | None:
    if isinstance(item, str):
        return item.strip()
    if isinstance(item, dict) and isinstance(item.get("question"), str):
        return item["question"].strip()
    return None


def parse_questions(text: str, n: int, prompt: str, truncated: bool = False) -> Parsed:
    """Up to `n` questions from a JSON list (fenced, wrapped in prose or in an object, or cut off) or a numbered list."""
    out = Parsed()
    body = _strip(text, out.repairs)
    if not body:
        out.error = "empty output"
        return out
    items: list[Any] | None = None
    start = body.find("[") if body.find("[") != -1 else body.find("{")
    if start != -1:
        try:
            value, end = json.JSONDecoder().raw_decode(body[start:])
            items = _items(value)
            if start > 0 or body[start + end :].strip():
                out.repairs.append("prose around JSON removed")
        except json.JSONDecodeError:
            strings = [json.loads(f'"{s}"') for s in _STRING.findall(body[start:])]
            strings = [s for s in strings if s.strip().endswith("?")]
            if strings:
                items = strings
                out.repairs.append(
                    "truncated JSON: complete items kept"
                    if truncated or not body.rstrip().endswith("]")
                    else "invalid JSON: quoted questions kept"
                )
    if items is None:
        lines = [m.group(1) for ln in body.splitlines() if (m := _NUMBERED.match(ln))]
        lines = [ln.strip('"') for ln in lines if ln.rstrip('"').endswith("?")]
        if lines:
            out.repairs.append("numbered list read as questions")
        else:
            lines = [q.strip(' "') for q in _QUESTION.findall(body)]
            if not lines:
                out.error = "no JSON list of questions and no question in the output"
                return out
            out.repairs.append("questions taken from prose")
        items = lines
    questions = [q for q in (_question_text(i) for i in items) if q]
    prompt_norm = _norm(prompt)
    kept = [q for q in questions if _norm(q) and _norm(q) not in prompt_norm]
    if len(kept) < len(questions):
        out.repairs.append("question copied from the prompt dropped")
    if len(kept) > n:
        out.repairs.append(f"{len(kept)} questions for {n} asked: first {n} kept")
        kept = kept[:n]
    if not kept:
        out.error = "no usable question in the output"
        return out
    out.value = kept
    return out


def _split_reasoning(text: str, given: str | None) -> tuple[str | None, str]:
    """(reasoning, rest): a `<think>` block in the text (or text before an unopened `</think>`),
    else the server's own reasoning field; the rest with the reasoning removed as `data.reasoning: strip` does."""
    m = _THINK_INNER.search(text)
    if m:
        reasoning = m.group(1)
    elif "</think>" in text:
        reasoning = text.split("</think>")[0]
    else:
        reasoning = given or ""
    return reasoning.strip() or None, strip_reasoning(text)


def parse_answer(
    text: str,
    question: str,
    truncated: bool,
    *,
    want_reasoning: bool = False,
    reasoning: str | None = None,
) -> Parsed:
    """An answer as plain text; a one-item list or {"answer": ...} unwrapped; empty, cut-off or echoed answers refused.

    With `want_reasoning` the reasoning (a `<think>` block, or the server's `reasoning_content`) goes to
    `Parsed.reasoning` and an answer without it is refused; otherwise a `<think>` block is dropped (a repair).
    """
    out = Parsed()
    if want_reasoning:
        out.reasoning, text = _split_reasoning(text, reasoning)
    body = _strip(text, out.repairs)
    if truncated:
        out.error = "answer cut off at the token limit"
        return out
    if want_reasoning and out.reasoning is None:
        out.error = "no reasoning block (<think>...</think>) before the answer"
        return out
    if body[:1] in "[{" and body:
        try:
            value = json.loads(body)
        except json.JSONDecodeError:
            value = None
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
            out.repairs.append("one-item list unwrapped")
        elif isinstance(value, list):
            out.error = f"a list of {len(value)} answers where one was asked"
            return out
        if isinstance(value, dict) and isinstance(value.get("answer"), str):
            value = value["answer"]
            out.repairs.append("answer object unwrapped")
        if isinstance(value, str):
            body = value.strip()
    body = re.sub(r"^(?:answer|a)\s*:\s*", "", body, flags=re.I).strip()
    if not body:
        out.error = "empty answer"
    elif _norm(body) == _norm(question):
        out.error = "answer repeats the question"
    else:
        out.value = body
    return out


def parse_score(text: str, scale: int) -> Parsed:
    """A judge's rating in 1..scale: a bare number, {"score": n}, or the one number in a sentence."""
    out = Parsed()
    body = _strip(text, out.repairs)
    value: Any = None
    with contextlib.suppress(json.JSONDecodeError):
        value = json.loads(body)
    if isinstance(value, dict):
        value = value.get("score", value.get("rating"))
    if isinstance(value, list) and len(value) == 1:
        value = value[0]
    if not (isinstance(value, int | float) and not isinstance(value, bool)):
        found = {float(n) for n in _NUMBER.findall(body)}
        if len(found) > 1:  # "4/5", "4 out of 5": the scale is not the score
            found.discard(float(scale))
        if len(found) != 1:
            out.error = f"no single score in the judge's output ({body[:60]!r})"
            return out
        value = found.pop()
        out.repairs.append("score taken from prose")
    if not 1 <= float(value) <= scale:
        out.error = f"score {value} outside 1..{scale}"
        return out
    out.value = float(value)
    return out
