"""The web UI's Data page: an uploaded file as `tunesmith data preview` and `data check` show it.

The same code paths: `data.build.build_data` tokenizes with the served base's tokenizer and
`data.preview.label_runs` splits each sample into trained and untrained stretches; the bad-row
report is `data.validate.read_samples(on_error="skip")`, as `data check` reads a source. Row
references name the file the user uploaded, not its stored path.
"""

from __future__ import annotations

from typing import Any

from tunesmith.config.schema import DataConfig, DataSource
from tunesmith.data.build import build_data
from tunesmith.data.errors import DataError
from tunesmith.data.preview import decode, label_runs, summary_lines
from tunesmith.data.validate import read_samples

MAX_SAMPLES = 20
MAX_ISSUES = 200


def preview_file(
    file_row: dict[str, Any],
    tokenizer: Any,
    method: str = "sft",
    seq_len: int = 1024,
    train_on_prompt: bool = False,
    n: int = 5,
) -> dict[str, Any]:
    """Samples with their trained runs, the data counts and every bad row of one uploaded file."""
    path, name = str(file_row["path"]), str(file_row["filename"])
    pairs = method == "dpo"

    def named(text: str) -> str:
        return text.replace(path, name)

    try:
        checked = read_samples(path, "auto", "skip", "data.train[0]", pairs=pairs)
    except DataError as exc:
        return {
            "file": file_row["id"],
            "filename": name,
            "error": named(str(exc)),
            "samples": [],
            "issues": [],
        }
    issues = [named(str(issue)) for issue in checked.issues[:MAX_ISSUES]]
    notes = [named(str(note)) for note in checked.notes[:MAX_ISSUES]]
    result: dict[str, Any] = {
        "file": file_row["id"],
        "filename": name,
        "rows": checked.rows_read,
        "good_rows": len(checked.samples),
        "issues": issues,
        "issue_count": len(checked.issues),
        "notes": notes,
        "samples": [],
        "summary": [],
    }
    if pairs:
        result["summary"] = [f"{len(checked.samples)} preference pairs read; the token view is for sft data"]
        return result
    config = DataConfig(
        train=[DataSource(path=path)],
        seq_len=seq_len,
        train_on_prompt=train_on_prompt,
        packing=False,
        on_error="skip",
        max_dropped_fraction=1.0,
        cache=False,
        shuffle=False,
    )
    try:
        built = build_data(config, tokenizer, "sft")
    except DataError as exc:
        result["error"] = named(str(exc))
        return result
    for sample in built.train[: max(0, min(n, MAX_SAMPLES))]:
        result["samples"].append(
            {
                "source": named(str(sample.source)),
                "tokens": len(sample.input_ids),
                "trained": sample.num_trained,
                "truncated": sample.truncated,
                "runs": [
                    {"trained": trained, "text": decode(tokenizer, ids)}
                    for trained, ids in label_runs(sample)
                ],
            }
        )
    result["total_samples"] = len(built.train)
    result["summary"] = [named(line) for line in summary_lines(built, seq_len, False)]
    return result
