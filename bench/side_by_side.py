"""What the side-by-side benches (tunesmith against another tool) share.

Each run is its own subprocess, so peak RSS is the whole process's; runs are interleaved
(tunesmith, other, tunesmith, other, ...) because the machine is shared and noisy; the results
file names the CPU, the thread count and torch's version beside every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Result = dict[str, Any]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def run_worker(script: str, work: Path, spec: dict[str, Any]) -> Result:
    """Run `script --worker SPEC` in a fresh process and return the result.json it writes."""
    work.mkdir(parents=True, exist_ok=True)
    spec = {**spec, "work_dir": str(work)}
    (work / "spec.json").write_text(json.dumps(spec))
    (work / "result.json").unlink(missing_ok=True)
    start = time.perf_counter()
    with open(work / "log.txt", "w", encoding="utf-8") as log:
        code = subprocess.call(
            [sys.executable, script, "--worker", str(work / "spec.json")],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    if code != 0 or not (work / "result.json").is_file():
        tail = (work / "log.txt").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{spec['tool']} run in {work} failed (exit {code}):\n{tail}")
    result = json.loads((work / "result.json").read_text())
    result["process_s"] = time.perf_counter() - start
    return result


def worker_main(spec_path: Path, runners: dict[str, Callable[[dict[str, Any]], Result]]) -> None:
    """The worker side: quiet the libraries, run the spec's tool, write its result."""
    from tunesmith.cli.quiet import quiet_libraries

    spec = json.loads(spec_path.read_text())
    quiet_libraries(verbose=False)
    result = runners[spec["tool"]](spec)
    (Path(spec["work_dir"]) / "result.json").write_text(json.dumps(result))


def interleaved(
    tools: Sequence[str],
    repeats: int,
    run: Callable[[str, int], Result],
    describe: Callable[[Result], str],
) -> dict[str, list[Result]]:
    """Every tool once per repeat, in turn, with one progress line per run."""
    runs: dict[str, list[Result]] = {tool: [] for tool in tools}
    for repeat in range(repeats):
        for tool in tools:
            runs[tool].append(run(tool, repeat))
            print(f"{tool} repeat {repeat + 1}: {describe(runs[tool][-1])}", flush=True)
    return runs


def write_results(
    args: argparse.Namespace, runs: dict[str, list[Result]], summary: dict[str, Any], table: str
) -> None:
    """The results file (machine, arguments, every run, the summary) and the table on screen."""
    import torch

    results = {
        "date": time.strftime("%Y-%m-%d"),
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "args": {k: str(v) for k, v in vars(args).items()},
        "runs": runs,
        "summary": summary,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1))
    print(f"\n{results['cpu']}, {results['threads']} threads, torch {results['torch']}\n")
    print(table)
