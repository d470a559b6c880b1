"""Which Jinja chat template a run renders conversations with.

The default is always the tokenizer's own ``chat_template``: it is what the model was tuned with and
what serving stacks will use. Built-ins exist for models whose files carry no template, or a wrong
one; each lives in ``builtin_templates/<name>.jinja`` and is checked byte for byte, in
``tests/unit/test_templates.py``, against the reference named below on plain system/user/assistant
conversations (single and multi-turn, with and without a system message, with and without a
generation prompt). Built-ins raise a template error on what they omit instead of rendering it
differently from the original.

Built-ins, what each is checked against, and what it omits:

- ``alpaca``: chujiezheng/chat_templates ``alpaca.jinja`` (no Alpaca model ships a template; this is
  the common "### Instruction:"/"### Response:" layout). Omits nothing; Stanford's fixed preamble is
  not added, pass it as the system message.
- ``chatml``: teknium/OpenHermes-2.5-Mistral-7B. Omits nothing (no default system prompt, no BOS).
- ``deepseek``: deepseek-ai/DeepSeek-V3. Omits tool calls and tool results. Not the DeepSeek-R1
  template nor deepseek-llm-7b-chat's "User:/Assistant:" format.
- ``gemma``: google/gemma-2-9b-it. Omits nothing; a system message is an error, as in the original.
- ``gemma3``: google/gemma-3-4b-it (system message prepended to the first user turn). Omits images.
- ``llama2``: meta-llama/Llama-2-7b-chat-hf. Omits nothing.
- ``llama3``: meta-llama/Meta-Llama-3-8B-Instruct. Omits nothing (3.1+ ship their own template).
- ``mistral``: mistralai/Mistral-7B-Instruct-v0.2 (the [INST] layout of v0.1 and Mixtral-8x7B). Omits nothing;
  v0.3 and later use another layout and ship their own template.
- ``phi3``: microsoft/Phi-3-mini-4k-instruct. Omits nothing.
- ``qwen2``: Qwen/Qwen2.5-7B-Instruct (Qwen's default system prompt). Omits tools, tool calls and
  tool results. Qwen2-Instruct 2.0 differs only in its default system prompt.
- ``qwen3``: Qwen/Qwen3-8B, thinking mode; honours the ``enable_thinking`` template variable exactly
  like the original. Omits tools, tool calls and tool results.
- ``qwen3_nothink``: Qwen/Qwen3-8B rendered with ``enable_thinking=False``, which is its default here
  (pass ``enable_thinking=True`` to get ``qwen3``). Same omissions as ``qwen3``.
- ``vicuna``: FastChat's "vicuna_v1.1" prompt builder (no Vicuna model ships a template), with its
  default system prompt. Omits nothing; writes BOS itself (FastChat leaves it to the tokenizer) and
  uses the tokenizer's EOS where FastChat writes "</s>".
- ``zephyr``: HuggingFaceH4/zephyr-7b-beta. Omits nothing.

Where an original silently drops a message it cannot place (unknown roles, tool turns), the built-in
raises instead, so a dataset never trains on a conversation with pieces missing.

Templates that use ``bos_token``/``eos_token``/``raise_exception`` get them from
``tokenizer.apply_chat_template``, which passes the tokenizer's special tokens and defines
``raise_exception``. Nothing here is read until it is first asked for.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterator, Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from tunesmith.data.errors import DataError

__all__ = [
    "BUILTIN_TEMPLATES",
    "ChatTemplateError",
    "list_templates",
    "resolve_template",
    "run_template",
    "training_template",
]

# Specs that mean "the tokenizer's own template".
_MODEL_SPECS = ("auto", "model")
_FILE_SUFFIXES = (".jinja", ".j2")
_PACKAGE_DIR = "builtin_templates"


class ChatTemplateError(DataError):
    """The chat template a run asked for cannot be found or read; the message says how to fix it."""


class _BuiltinTemplates(Mapping[str, str]):
    """Read-only name -> Jinja text mapping over the packaged ``*.jinja`` files.

    Lazy so that importing tunesmith reads no files; the directory is listed on first use and each
    file is read once, when it is first looked up.
    """

    def __init__(self) -> None:
        self._names: tuple[str, ...] | None = None
        self._texts: dict[str, str] = {}

    def _dir(self) -> Any:
        return resources.files("tunesmith.data").joinpath(_PACKAGE_DIR)

    def _listing(self) -> tuple[str, ...]:
        if self._names is None:
            self._names = tuple(
                sorted(
                    entry.name[: -len(".jinja")]
                    for entry in self._dir().iterdir()
                    if entry.name.endswith(".jinja") and entry.is_file()
                )
            )
        return self._names

    def __getitem__(self, name: str) -> str:
        if name not in self._texts:
            if name not in self._listing():
                raise KeyError(name)
            self._texts[name] = self._dir().joinpath(f"{name}.jinja").read_text(encoding="utf-8")
        return self._texts[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._listing())

    def __len__(self) -> int:
        return len(self._listing())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._listing()

    def __repr__(self) -> str:
        return f"BUILTIN_TEMPLATES({', '.join(self._listing())})"


BUILTIN_TEMPLATES: Mapping[str, str] = _BuiltinTemplates()


def list_templates() -> list[str]:
    """Names of the built-in chat templates, sorted."""
    return list(BUILTIN_TEMPLATES)


def _choices(with_auto: bool = True) -> str:
    """The fix every error names: the accepted values of ``data.template``."""
    auto = "auto (the tokenizer's own template), " if with_auto else ""
    return f"set data.template to one of: {auto}{', '.join(list_templates())}, or a path to a .jinja file"


def _tokenizer_template(tokenizer: Any) -> str | None:
    """The tokenizer's default template; transformers may store several by name in a dict."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, Mapping):
        template = template.get("default")
    return template if isinstance(template, str) and template.strip() else None


def resolve_template(tokenizer: Any, spec: str | None) -> str:
    """The Jinja chat template text that ``spec`` (``data.template``) names.

    ``None``, ``"auto"`` or ``"model"``: the tokenizer's own template (the default, since it is what
    the model was trained with). A built-in name: that built-in. A path ending in ``.jinja``/``.j2``:
    the file's text. Anything else, a missing file, or a tokenizer without a template raises
    :class:`ChatTemplateError` naming the accepted values.
    """
    if spec is None or spec.strip().lower() in _MODEL_SPECS:
        template = _tokenizer_template(tokenizer)
        if template is None:
            source = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
            raise ChatTemplateError(
                f"the tokenizer of {source!r} has no chat template, so data.template={spec or 'auto'!r} "
                f"cannot be used; {_choices(with_auto=False)}"
            )
        return template

    name = spec.strip()
    if name in BUILTIN_TEMPLATES:
        return BUILTIN_TEMPLATES[name]

    if name.lower().endswith(_FILE_SUFFIXES):
        path = Path(name).expanduser()
        if not path.is_file():
            raise ChatTemplateError(
                f"data.template: chat template file {str(path)!r} does not exist; {_choices()}"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ChatTemplateError(
                f"data.template: cannot read chat template file {str(path)!r}: {exc}"
            ) from exc
        if not text.strip():
            raise ChatTemplateError(f"data.template: chat template file {str(path)!r} is empty")
        return text

    close = difflib.get_close_matches(name, list_templates(), n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ChatTemplateError(f"data.template: unknown chat template {name!r}{hint}; {_choices()}")


def run_template(config: Mapping[str, Any], tokenizer: Any) -> tuple[str | None, list[str]]:
    """The chat template a run trained with, from its config as a mapping (``config.yaml``'s content).

    The first training source's ``template`` (else ``data.template``), resolved against
    ``tokenizer``; the tokenizer's own when the run names none; None for ``pretrain`` (no template
    is used) or when neither exists. The notes say when the sources disagree, since only one
    template can travel with the run.
    """
    own = _tokenizer_template(tokenizer)
    if config.get("method") == "pretrain":
        return own, []
    section = config.get("data") or {}
    specs = [source.get("template") or section.get("template") for source in section.get("train") or [{}]]
    notes = []
    if len(set(specs)) > 1:
        notes.append(
            f"the training sources used different chat templates ({sorted(map(str, set(specs)))}); "
            "the run carries the first source's"
        )
    if specs[0] is None and own is None:
        return None, notes
    return resolve_template(tokenizer, specs[0]), notes


def training_template(run_dir: Path, tokenizer: Any) -> tuple[str | None, list[str]]:
    """`run_template` read from ``run_dir/config.yaml``; the tokenizer's own without that file."""
    import yaml

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        return _tokenizer_template(tokenizer), []
    return run_template(yaml.safe_load(path.read_text(encoding="utf-8")) or {}, tokenizer)
