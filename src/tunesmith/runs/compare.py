"""`tunesmith runs compare RUN RUN ...`: the runs' loss curves in one plot and the config keys that differ."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunesmith.config.load import ConfigError
from tunesmith.runs.overview import _read_config, is_run_dir
from tunesmith.training.metrics import read_metrics
from tunesmith.training.resume_policy import flatten

IGNORED_KEYS = ("output.dir",)
"""Keys that differ between any two runs by construction: the runs are already named by their paths."""
UNSET = "<unset>"


@dataclass
class Curves:
    label: str
    train: list[tuple[int, float]]
    eval: list[tuple[int, float]]


@dataclass
class PlottedLine:
    """One line as matplotlib drew it (read back from the axes, not from the input)."""

    label: str
    steps: list[float]
    values: list[float]


def check_runs(paths: list[Path]) -> None:
    if len(paths) < 2:
        raise ConfigError("tunesmith runs compare: give at least two run directories")
    for path in paths:
        if not is_run_dir(path):
            raise ConfigError(
                f"tunesmith runs compare: {path} is not a tunesmith run directory (no config.yaml with "
                "metrics.jsonl or status.json); list the runs of a folder with `tunesmith runs DIR`"
            )


def run_labels(paths: list[Path]) -> list[str]:
    """The shortest path tails that tell the runs apart (`a`, `b`; or `x/run`, `y/run`)."""
    parts = [p.resolve().parts for p in paths]
    for n in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-n:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def read_curves(run_dir: Path, label: str) -> Curves:
    path = run_dir / "metrics.jsonl"
    rows = read_metrics(path) if path.is_file() else []
    return Curves(
        label,
        [(r["step"], r["loss"]) for r in rows if _finite(r.get("loss"))],
        [(r["step"], r["eval_loss"]) for r in rows if _finite(r.get("eval_loss"))],
    )


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def plot_comparison(curves: list[Curves], out_path: Path) -> list[PlottedLine]:
    """Train loss (solid) and eval loss (dashed, dots) of every run, one colour per run, into one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(curves):
        colour = colours[i % len(colours)]
        if run.train:
            ax.plot(*zip(*run.train, strict=True), color=colour, label=f"{run.label} train", linewidth=1.2)
        if run.eval:
            ax.plot(
                *zip(*run.eval, strict=True), "o--", color=colour, label=f"{run.label} eval", linewidth=1.2
            )
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / trained token)")
    ax.grid(alpha=0.3)
    if ax.get_lines():
        ax.legend()
    fig.tight_layout()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path)
    plotted = [
        PlottedLine(
            str(line.get_label()), [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]
        )
        for line in ax.get_lines()
    ]
    plt.close(fig)
    return plotted


def config_diff(configs: list[dict[str, Any]], labels: list[str]) -> dict[str, dict[str, Any]]:
    """{dotted key: {label: value}} for every key whose value is not the same in all runs."""
    flat = [flatten(config) for config in configs]
    keys = sorted({key for f in flat for key in f} - set(IGNORED_KEYS))
    diff = {}
    for key in keys:
        values = [f.get(key, UNSET) for f in flat]
        if any(v != values[0] for v in values[1:]):
            diff[key] = dict(zip(labels, values, strict=True))
    return diff


@dataclass
class Comparison:
    labels: list[str]
    paths: list[str]
    plot: str
    lines: list[PlottedLine]
    differing: dict[str, dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        return {
            "runs": dict(zip(self.labels, self.paths, strict=True)),
            "plot": self.plot,
            "curves": {
                line.label: [[_step(x), y] for x, y in zip(line.steps, line.values, strict=True)]
                for line in self.lines
            },
            "config_diff": self.differing,
        }


def compare_runs(paths: list[Path], out_path: Path) -> Comparison:
    check_runs(paths)
    labels = run_labels(paths)
    curves = [read_curves(path, label) for path, label in zip(paths, labels, strict=True)]
    lines = plot_comparison(curves, out_path)
    differing = config_diff([_read_config(path) for path in paths], labels)
    return Comparison(labels, [str(p) for p in paths], str(out_path), lines, differing)


def format_comparison(result: Comparison) -> str:
    lines = [f"curves of {len(result.labels)} runs: {result.plot}"]
    if not result.differing:
        lines.append("configs: no key differs (besides output.dir)")
        return "\n".join(lines)
    lines.append(f"config keys that differ ({len(result.differing)}):")
    width = max(len(key) for key in result.differing)
    for key, values in result.differing.items():
        shown = "  ".join(f"{label}={_show(value)}" for label, value in values.items())
        lines.append(f"  {key.ljust(width)}  {shown}")
    return "\n".join(lines)


def _step(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _show(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."
