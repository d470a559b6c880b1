"""tunesmith at two git revisions side by side: does a change make the training step slower?

    .venv/bin/python bench/version_ab.py --base 35b7474 --rounds 3
    .venv/bin/python bench/version_ab.py --base HEAD~1 --candidate WORKTREE --precision bf16

Each revision is checked out into its own worktree (the candidate defaults to the working tree as
it is on disk) and run through that revision's own `bench/worker.py` with `PYTHONPATH` pointing at
its `src/`, so each process imports the code it claims to measure (the worker records a hash of the
sources it read). Runs alternate base, candidate, base, ... because the machine is shared, and the
summary is the median over rounds of the train time and of the best-of-rounds per-step time, as a
ratio candidate / base. The per-step losses of both revisions are compared too: a refactor that
should not change the numbers shows a maximum difference of 0.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(BENCH))

import run as bench_run  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="git revision to compare against")
    p.add_argument("--candidate", default="WORKTREE", help="git revision, or WORKTREE for the files on disk")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--workload", choices=["lora", "full"], default="lora")
    p.add_argument("--precision", choices=["fp32", "bf16", "default"], default="fp32")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16)
    p.add_argument("--n-eval", type=int, default=4)
    p.add_argument("--work-dir", type=Path, default=Path("/tmp/tunesmith-version-ab"))
    p.add_argument("--results", type=Path, default=BENCH / "results" / "version-ab-latest.json")
    return p.parse_args(argv)


def checkout(revision: str, work_dir: Path) -> tuple[Path, str]:
    """A clean tree of `revision` (or this working tree) and the commit it resolves to."""
    if revision == "WORKTREE":
        head = git("rev-parse", "--short", "HEAD")
        dirty = " (+ uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else ""
        return REPO, head + dirty
    commit = git("rev-parse", "--short", revision)
    tree = work_dir / f"tree-{commit}"
    if not tree.is_dir():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit], check=True)
    return tree, commit


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True
    ).stdout.strip()


def run_tree(tree: Path, spec: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    """One training run with the tunesmith of `tree`, in its own process."""
    run_dir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = run_dir / "spec.json", run_dir / "result.json"
    spec_path.write_text(json.dumps({**spec, "work_dir": str(run_dir)}), encoding="utf-8")
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "PYTHONPATH": str(tree / "src") + os.pathsep + str(tree / "bench")}
    with open(run_dir / "log.txt", "w", encoding="utf-8") as log:
        code = subprocess.call(
            [sys.executable, str(tree / "bench" / "worker.py"), str(spec_path), str(result_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=tree,
            env=env,
        )
    if code != 0 or not result_path.is_file():
        tail = (run_dir / "log.txt").read_text(encoding="utf-8", errors="replace")[-3000:]
        raise SystemExit(f"{tree}: the run failed (exit code {code}):\n{tail}")
    return json.loads(result_path.read_text(encoding="utf-8"))


def summarize(runs: dict[str, list[dict[str, Any]]], tokens: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, results in runs.items():
        out[name] = {
            "train_s_median": statistics.median(r["train_s"] for r in results),
            "tokens_per_s_median": tokens / statistics.median(r["train_s"] for r in results),
            "best_of_steps_s": bench_run.best_of_steps_seconds(results),
            "peak_rss_gb_median": statistics.median(r["peak_rss"] for r in results) / 1e9,
            "sources": sorted({r["source"]["src_sha256"] for r in results}),
        }
    base, cand = out["base"], out["candidate"]
    out["ratio_train_s"] = cand["train_s_median"] / base["train_s_median"]
    if base["best_of_steps_s"] and cand["best_of_steps_s"]:
        out["ratio_best_of_steps"] = cand["best_of_steps_s"] / base["best_of_steps_s"]
    losses = [[s["loss"] for s in runs[name][0]["steps"]] for name in ("base", "candidate")]
    same_length = len(losses[0]) == len(losses[1])
    out["max_loss_difference"] = (
        max(abs(a - b) for a, b in zip(*losses, strict=True)) if same_length else "different step counts"
    )
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    args.work_dir.mkdir(parents=True, exist_ok=True)
    trees = {"base": checkout(args.base, args.work_dir), "candidate": checkout(args.candidate, args.work_dir)}
    data = bench_run.prepare_data(args)
    spec = {
        "model_dir": data["model_dir"],
        "train_jsonl": data["train_jsonl"],
        "train_tokenized": data["train_tokenized"],
        "eval_tokenized": data["eval_tokenized"],
        "seq_len": args.seq_len,
        "samples_per_step": args.batch,
        "rows_per_step": data["rows_per_step"],
        "lr": args.lr,
        "seed": args.seed,
        "lora_r": args.lora_r,
        "lora_alpha": args.lora_alpha,
        "precision": args.precision,
        "tool": "tunesmith",
        "workload": args.workload,
    }
    runs: dict[str, list[dict[str, Any]]] = {"base": [], "candidate": []}
    for round_index in range(args.rounds):
        for name, (tree, _commit) in trees.items():
            t = time.perf_counter()
            result = run_tree(tree, spec, args.work_dir / f"{name}-{round_index}")
            runs[name].append(result)
            print(
                f"[{round_index + 1}/{args.rounds}] {name}: train {result['train_s']:.1f}s, "
                f"final loss {result['steps'][-1]['loss']:.6f} ({time.perf_counter() - t:.0f}s)",
                flush=True,
            )
    tokens = sum(data["lengths"])
    summary = summarize(runs, tokens)
    machine = bench_run.machine_info()
    results = {
        "command": "python bench/version_ab.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine,
        "revisions": {name: commit for name, (_tree, commit) in trees.items()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "summary": summary,
        "runs": runs,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(results, indent=1), encoding="utf-8")
    print(
        f"\n{results['command']}\n{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}\n"
        f"base {trees['base'][1]}: train {summary['base']['train_s_median']:.2f}s median; "
        f"candidate {trees['candidate'][1]}: {summary['candidate']['train_s_median']:.2f}s median\n"
        f"candidate / base: train time {summary['ratio_train_s']:.3f}x, best-of-rounds steps "
        f"{summary.get('ratio_best_of_steps', float('nan')):.3f}x; "
        f"max per-step loss difference {summary['max_loss_difference']}\nresults: {args.results}"
    )
    return results


if __name__ == "__main__":
    main()
