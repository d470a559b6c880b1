"""The one sample type every data format is converted into before templating."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant", "tool")


@dataclass(frozen=True)
class RowRef:
    """Where a sample came from, so that every message about it can name `file:line`."""

    file: str
    line: int
    # "line" for text formats (a 1-based physical line); "row" where lines do not exist (parquet).
    unit: str = "line"

    def __str__(self) -> str:
        if self.unit == "line":
            return f"{self.file}:{self.line}"
        return f"{self.file}:{self.unit} {self.line}"


@dataclass(frozen=True)
class Message:
    role: str
    content: str
    # None: the role decides (assistant trained, others not); 0/1 from OpenAI-style `weight`.
    weight: float | None = None
    tool_calls: list[dict[str, Any]] | None = None
    name: str | None = None

    def to_template_dict(self) -> dict[str, Any]:
        """The dict a Jinja chat template expects."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.name:
            out["name"] = self.name
        return out


@dataclass(frozen=True)
class Conversation:
    messages: tuple[Message, ...]
    source: RowRef
    tools: list[dict[str, Any]] | None = field(default=None)


@dataclass(frozen=True)
class TextSample:
    """Raw text for continued pretraining: every token is trained."""

    text: str
    source: RowRef


Sample = Conversation | TextSample
