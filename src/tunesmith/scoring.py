"""Score text with a finished reward run (`method: reward`): `tunesmith.score(run, prompt, response)`.

A response is tokenized exactly as training tokenized one answer of a pair (the run's chat template,
`data.seq_len` and `data.reasoning`: the prompt rendered with the generation prompt, then the
answer's tokens), and scored by the same module the training forward used (`RewardScorer`), with
the run's adapter or model and its `head.safetensors`. Several responses share one padding-free
packed row, as pairs did in training, so a score here is the score training computed.

(The module is `scoring`, not `score`: importing a submodule `tunesmith.score` would replace the
package's `tunesmith.score` function with the module.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith.data.conversation import RowRef
from tunesmith.data.errors import DataError
from tunesmith.data.formats import RowError
from tunesmith.data.preference_tokenize import TokenizedPair

__all__ = ["RewardRun", "load_reward_model", "score", "score_file"]

Row = dict[str, Any]


@dataclass
class RewardRun:
    """A loaded reward run: call `score` for one response, `score_rows` for many."""

    scorer: Any  # RewardScorer, in eval mode, on `device`
    tokenizer: Any
    template: str
    seq_len: int
    reasoning: Any
    block_mask: str
    device: torch.device

    def score(self, prompt: str | list[Row], response: str | list[Row]) -> float:
        """The reward of `response` to `prompt` (a string, or OpenAI messages as in pair rows)."""
        return self.score_rows([{"prompt": prompt, "response": response}])[0]["score"]

    def score_rows(
        self, rows: Iterable[Row], batch_size: int = 16, refs: Sequence[RowRef] | None = None
    ) -> list[dict[str, float]]:
        """Per row: `{"score": r}` for a `prompt` + `response` row; `{"chosen_score": ..,
        "rejected_score": ..}` for a preference pair (any layout training reads). `refs` name the
        rows in errors (default: their index in `rows`)."""
        from tunesmith.training.methods.pairs import pair_samples

        rows = list(rows)
        refs = refs or [RowRef("rows", i, "index") for i in range(len(rows))]
        items = [self._tokenized(row, ref) for row, ref in zip(rows, refs, strict=True)]
        samples = [s for pair, single in items for s in pair_samples(pair)[: 1 if single else 2]]
        scores = iter(self.score_samples(samples, batch_size))
        return [
            {"score": next(scores)}
            if single
            else {"chosen_score": next(scores), "rejected_score": next(scores)}
            for _, single in items
        ]

    @torch.no_grad()
    def score_samples(self, samples: Sequence[Any], batch_size: int = 16) -> list[float]:
        """Scores of tokenized samples (prompt unlabelled, answer labelled), `batch_size` per packed row."""
        from tunesmith.data.packing import collate_packed

        scores: list[float] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            batch = collate_packed([chunk], self.tokenizer.pad_token_id, self.block_mask)
            batch = {k: v.to(self.device) for k, v in batch.items()}
            scores.extend(float(s) for s in self.scorer(**batch))
        return scores

    def _tokenized(self, row: Any, ref: RowRef) -> tuple[TokenizedPair, bool]:
        """The row as a tokenized pair (a single response is both answers), and whether it was single."""
        from tunesmith.data.preference_formats import to_pair
        from tunesmith.data.preference_tokenize import tokenize_pair

        single = isinstance(row, dict) and "response" in row
        try:
            if single:
                if "prompt" not in row:
                    raise RowError('missing key "prompt" (a scored row holds a prompt and a response)')
                fields = {k: v for k, v in row.items() if k not in ("response", "chosen", "rejected")}
                row = {**fields, "chosen": row["response"], "rejected": row["response"]}
            sample = to_pair(row, ref)
            pair = tokenize_pair(self.tokenizer, self.template, sample, self.seq_len, self.reasoning)
        except (RowError, DataError) as exc:
            reason = str(exc).replace("chosen", "response") if single else str(exc)
            raise DataError(f"{ref}: {reason}") from None
        return pair, single


def load_reward_model(
    run_dir: str | Path, device: str | torch.device | None = None, template: str | None = None
) -> RewardRun:
    """Load a finished reward run once, to score many texts. `template` overrides the run's chat template."""
    from tunesmith.config.load import ConfigError, load_config
    from tunesmith.models.attention import choose_attention, packed_mask_kind
    from tunesmith.models.load import load_tokenizer
    from tunesmith.training.errors import RunDirError
    from tunesmith.training.methods.reward import RewardScorer
    from tunesmith.training.run_dir import read_run_info

    run = Path(run_dir)
    info = read_run_info(run)
    if info.get("method") != "reward" or not info.get("head"):
        raise RunDirError(
            f"{run} was trained with method {info.get('method')!r}; scoring needs a reward model run "
            "(method: reward), which saves a score head beside its model"
        )
    cfg = load_config(_run_config_data(run / "config.yaml"))
    target = run / info["kind"]
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    try:  # the run's kernel where this device has it (every kernel gives the same scores to ~1e-6)
        attention = choose_attention(cfg.train.attention, device.type)
    except ConfigError:
        attention = choose_attention("auto", device.type)
    model = _load_model(target, Path(info["base_model"]), info["kind"], attention, cfg.trust_remote_code)
    tokenizer = load_tokenizer(target, cfg.trust_remote_code)
    scorer = RewardScorer(model, cfg.train.loss_chunk_size)
    _load_head(scorer, target / info["head"])
    return RewardRun(
        scorer.to(device).eval(),
        tokenizer,
        _run_template(cfg, tokenizer) if template is None else _resolve(tokenizer, template),
        cfg.data.seq_len,
        cfg.data.reasoning,
        packed_mask_kind(getattr(model.config, "_attn_implementation", attention)),
        device,
    )


def score(
    run: str | Path | RewardRun,
    prompt: str | list[Row] | None = None,
    response: str | list[Row] | None = None,
    *,
    rows: Iterable[Row] | None = None,
    batch_size: int = 16,
) -> float | list[dict[str, float]]:
    """`score(run, prompt, response)` -> the reward; `score(run, rows=[...])` -> one dict per row
    (see `RewardRun.score_rows`). `run` is a run directory or a `load_reward_model` result."""
    single = prompt is not None or response is not None
    if single == (rows is not None) or (single and (prompt is None or response is None)):
        raise ValueError("score: give prompt and response, or rows=[...] (not both)")
    loaded = run if isinstance(run, RewardRun) else load_reward_model(run)
    if rows is not None:
        return loaded.score_rows(rows, batch_size)
    assert prompt is not None and response is not None
    return loaded.score(prompt, response)


def score_file(run: RewardRun, path: Path, batch_size: int = 16) -> list[Row]:
    """Each row of a JSONL file with its scores added (`score`, or `chosen_score` + `rejected_score`)."""
    rows: list[Row] = []
    refs: list[RowRef] = []
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            refs.append(RowRef(str(path), line_no))
    scores = run.score_rows(rows, batch_size, refs)
    return [{**row, **scored} for row, scored in zip(rows, scores, strict=True)]


def _run_config_data(path: Path) -> dict[str, Any]:
    """The run's config.yaml as a dict, without the other methods' sections.

    config.yaml is a full dump (every method's section at its defaults), which `load_config` refuses
    for any method but sft ("a dpo: section is set but method is 'reward'").
    """
    import yaml

    from tunesmith.config.schema import METHOD_SECTIONS

    data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    return {k: v for k, v in data.items() if k not in METHOD_SECTIONS or k == data.get("method")}


def _load_model(target: Path, base_dir: Path, kind: str, attention: str, trust_remote_code: bool) -> Any:
    from tunesmith.models.load import load_model

    if kind != "adapter":
        return load_model(target, torch.float32, trust_remote_code, attention)
    from peft import PeftModel

    if not base_dir.is_dir():
        raise FileNotFoundError(f"the base model of {target} is gone: {base_dir}")
    base = load_model(base_dir, torch.float32, trust_remote_code, attention)
    return PeftModel.from_pretrained(base, target)


def _load_head(scorer: Any, path: Path) -> None:
    from safetensors.torch import load_file

    weights = load_file(path)
    missing = set(dict(scorer.score.named_parameters(prefix="score"))) - set(weights)
    if missing:
        raise ValueError(f"{path} lacks {sorted(missing)}; is this a reward run's head?")
    with torch.no_grad():
        scorer.score.weight.copy_(weights["score.weight"])


def _run_template(cfg: Any, tokenizer: Any) -> str:
    """The chat template training used: the train sources' one (they must agree), else data.template."""
    from tunesmith.data.build import source_template

    found = {
        source_template(source, f"data.train[{i}]", cfg.data, tokenizer, "reward") or ""
        for i, source in enumerate(cfg.data.train)
    }
    if len(found) != 1:
        raise ValueError(
            "score: this run's training sources use different chat templates; pass template=... "
            "(a built-in name or a .jinja path) to choose the one to score with"
        )
    return found.pop()


def _resolve(tokenizer: Any, template: str) -> str:
    from tunesmith.data.templates import resolve_template

    return resolve_template(tokenizer, template)
