"""Run evaluation tasks on a model: dispatch by kind, and load a model once for many tasks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from tunesmith.config.schema import EvalTask
from tunesmith.eval.results import TaskResult


def run_task(
    model: Any, tokenizer: Any, task: EvalTask, *, log_samples: bool = False, template: str | None = None
) -> TaskResult:
    """One task's result; the model is in eval mode during it and back in its own mode after.

    `template` (perplexity only): a `data.template` value; None is the tokenizer's own template.
    """
    with eval_mode(model):
        if task.kind == "perplexity":
            from tunesmith.eval.perplexity import evaluate_perplexity

            return evaluate_perplexity(model, tokenizer, task, log_samples=log_samples, template=template)
        if task.kind == "gen":
            from tunesmith.eval.gen import evaluate_gen

            return evaluate_gen(model, tokenizer, task, log_samples=log_samples)
        from tunesmith.eval.mc import evaluate_mc

        return evaluate_mc(model, tokenizer, task, log_samples=log_samples)


def evaluate_model(
    spec: str,
    tasks: Sequence[EvalTask],
    *,
    log_samples: bool = False,
    device: str | None = None,
    on_result: Any = None,
) -> list[TaskResult]:
    """Load `spec` (a run, adapter or model directory, a `.gguf`, or `default`) once and run every task.

    `device`: where to run (None: CUDA when there is one, else the CPU). `on_result(result)` is called
    after each task, for progress.
    """
    import torch

    from tunesmith.infer.loading import load_for_inference

    model, tokenizer = load_for_inference(spec)
    target = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if target != "cpu":
        model = model.to(target)
    results = []
    for task in tasks:
        result = run_task(model, tokenizer, task, log_samples=log_samples)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return results


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """No dropout inside; each module's own train/eval flag restored after (training calls this too)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes:
            module.train(mode)
