"""Request bodies of the OpenAI API, as far as this server honours them (the `openai` package's
`types/` are the reference for names and ranges).

Fields a client may send that change nothing here (`user`, `metadata`, `store`, ...) are accepted and
ignored; fields that would change the answer but are not implemented (tools, penalties, `suffix`,
`logit_bias`) are refused by `refuse_unsupported` rather than silently dropped.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunesmith.serve.errors import APIError, bad_request

MAX_STOP = 4


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    max_tokens: int | None = None
    n: int = Field(default=1, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    def stop_list(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise bad_request(f"stop: at most {MAX_STOP} stop sequences, got {len(stops)}", "stop")
        return [s for s in stops if s]

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Body):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)

    def token_limit(self) -> tuple[int | None, str]:
        """The completion cap asked for and the field that asked (max_completion_tokens wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def template_messages(self) -> list[dict[str, str]]:
        """Messages for the chat template: `developer` is OpenAI's new name for `system`."""
        return [
            {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
            for m in self.messages
        ]


class CompletionRequest(_Body):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=5)
    echo: bool = False
    suffix: str | None = None

    def token_limit(self) -> tuple[int | None, str]:
        return (16 if self.max_tokens is None else self.max_tokens), "max_tokens"  # OpenAI's default is 16

    def prompts(self) -> list[str | list[int]]:
        """One entry per prompt: text, or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]


_UNSUPPORTED = ("tools", "functions", "tool_choice", "logit_bias", "response_format", "best_of")
_NEUTRAL: dict[str, tuple[Any, ...]] = {  # values that ask for nothing this server lacks
    "tool_choice": (None, "none", "auto"),
    "response_format": (None, {"type": "text"}),
    "best_of": (None, 1),
}


def parse(model: type[_Body], data: Any) -> Any:
    """Validate a decoded JSON body into `model`, or raise a 400 that names the field."""
    if not isinstance(data, dict):
        raise bad_request("The request body must be a JSON object.")
    try:
        body = model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors(include_url=False)[0]
        param = _param(first["loc"])
        if first["type"] == "missing":
            raise bad_request(
                f"Missing required parameter: '{param}'.", param, "missing_required_parameter"
            ) from None
        raise bad_request(f"Invalid value for '{param}': {first['msg']}.", param, "invalid_value") from None
    refuse_unsupported(body)
    return body


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


def _param(loc: tuple[Any, ...]) -> str | None:
    """The field path of a pydantic error, without the union-member tags it adds (`stop.str`,
    `messages.0.content.list[TextPart]`): what OpenAI's `param` names."""
    parts: list[str] = []
    for part in loc:
        text = str(part)
        if text.lower() in _TYPE_TAGS or "[" in text or "-" in text:
            break
        parts.append(text)
    return ".".join(parts) or None


def refuse_unsupported(body: _Body) -> None:
    extra = body.model_extra or {}
    for name in _UNSUPPORTED:
        if extra.get(name) not in _NEUTRAL.get(name, (None, [], {})):
            raise bad_request(f"'{name}' is not supported by this server.", name, "unsupported_parameter")
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0, 0.0):
            raise bad_request(
                f"'{name}' is not supported by this server (only 0).", name, "unsupported_parameter"
            )
    if isinstance(body, CompletionRequest) and body.suffix:
        raise bad_request("'suffix' is not supported by this server.", "suffix", "unsupported_parameter")
    if isinstance(body, ChatRequest) and body.top_logprobs and not body.logprobs:
        raise bad_request("'top_logprobs' needs 'logprobs': true.", "top_logprobs", "invalid_value")


__all__ = ["APIError", "ChatRequest", "CompletionRequest", "parse"]
