"""Show tokenized preference pairs: the shared prompt, then the chosen and the rejected completion.

Each part is decoded from exactly the ids training uses, special tokens kept, so a missing or
doubled end-of-turn token, or a prompt cut by `seq_len`, is visible. The scored parts (the two
completions) are coloured in a terminal and wrapped in `[[...]]` elsewhere, as for SFT.
"""

from __future__ import annotations

from typing import Any

from tunesmith.data.build import BuiltData
from tunesmith.data.preference_tokenize import TokenizedPair
from tunesmith.data.preview import CLOSE, OPEN, PROMPT_STYLE, SHOWN_PROBLEMS, TRAINED_STYLE, decode

Parts = list[tuple[str, list[int]]]
"""Labelled id lists; the first, "prompt", is shown dim and unscored, the others as scored."""


def marked_parts(tokenizer: Any, parts: Parts) -> str:
    """Labelled blocks, each scored part wrapped in `[[` `]]`."""
    blocks = []
    for name, ids in parts:
        text = decode(tokenizer, ids)
        blocks.append(f"{name}:\n{text if name == 'prompt' else OPEN + text + CLOSE}")
    return "\n".join(block if block.endswith("\n") else block + "\n" for block in blocks)


def rich_parts(tokenizer: Any, parts: Parts) -> Any:
    """Labelled blocks as a `rich.text.Text`: labels bold, the prompt dim, scored parts bold green."""
    from rich.text import Text

    text = Text()
    for name, ids in parts:
        text.append(f"{name}:\n", style="bold")
        body = decode(tokenizer, ids)
        text.append(body, style=PROMPT_STYLE if name == "prompt" else TRAINED_STYLE)
        if not body.endswith("\n"):
            text.append("\n")
    return text


def pair_parts(pair: TokenizedPair) -> list[tuple[str, list[int]]]:
    return [("prompt", pair.prompt_ids), ("chosen", pair.chosen_ids), ("rejected", pair.rejected_ids)]


def pair_header(pair: TokenizedPair, index: int, total: int) -> str:
    cut = ", prompt truncated" if pair.truncated else ""
    return (
        f"pair {index + 1} of {total} ({pair.source}, prompt {len(pair.prompt_ids)} tokens, "
        f"chosen {len(pair.chosen_ids)}, rejected {len(pair.rejected_ids)}{cut})"
    )


def marked_pair(tokenizer: Any, pair: TokenizedPair) -> str:
    """The pair as labelled blocks, each scored completion wrapped in `[[` `]]`."""
    return marked_parts(tokenizer, pair_parts(pair))


def rich_pair(tokenizer: Any, pair: TokenizedPair) -> Any:
    """The pair as a `rich.text.Text`: labels bold, the prompt dim, the completions bold green."""
    return rich_parts(tokenizer, pair_parts(pair))


def pair_record(tokenizer: Any, pair: TokenizedPair) -> dict[str, Any]:
    """One pair as JSON-ready data: the three id lists, their text and where the pair came from."""
    record: dict[str, Any] = {"source": str(pair.source)}
    for name, ids in pair_parts(pair):
        record[f"{name}_ids"] = list(ids)
    for name, ids in pair_parts(pair):
        record[name] = decode(tokenizer, ids)
    record["truncated"] = pair.truncated
    return record


def pair_summary_lines(built: BuiltData) -> list[str]:
    """The counts to check before training on pairs: pairs, tokens, losses, per source, problems."""
    report = built.report
    identical: list[Any] = getattr(report, "identical", [])
    lines = [
        f"pairs: {report.train_samples} train, {report.eval_samples} eval",
        f"tokens: {report.train_tokens} read by the model ({report.trained_tokens} scored)",
        f"prompts truncated: {report.truncated}  skipped: {len(report.skipped)}  "
        f"dropped: {len(report.dropped)}  duplicates: {report.duplicates}  identical: {len(identical)}",
        "sources:",
    ]
    lines += [f"  {source.line()}" for source in report.sources]
    for title, issues in (
        ("skipped and dropped rows:", report.skipped + report.dropped),
        ("notes:", identical),
    ):
        if issues:
            lines.append(title)
            lines += [f"  {issue}" for issue in issues[:SHOWN_PROBLEMS]]
        if len(issues) > SHOWN_PROBLEMS:
            lines.append(f"  ... and {len(issues) - SHOWN_PROBLEMS} more")
    return lines
