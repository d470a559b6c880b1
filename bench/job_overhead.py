"""What a fine-tuning job costs over a bare `tunesmith train` of the same config.

    .venv/bin/python bench/job_overhead.py [--repeats 3] [--steps 10]

Starts `tunesmith serve default --storage DIR` once, then, interleaved per repeat: uploads a chat
file and creates a job through the official `openai` client, timing job creation -> first logged
step -> succeeded; and runs `tunesmith train` on the config that job ran (its own `config.yaml`,
with another output directory), timing process start -> first logged step -> exit. The gaps
between the two are the service's start-up latency and overhead. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROWS = [
    ("What is your name?", "My name is Quill."),
    ("Who made you?", "The tunesmith team made me."),
    ("What are you for?", "I show how fine-tuning works."),
    ("Say hello.", "Hello from Quill!"),
] * 4


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def first_step_at(metrics: Path, deadline: float) -> float:
    while time.monotonic() < deadline:
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"no step logged in {metrics}")


def timed_job(client: Any, storage: Path, data: bytes) -> dict[str, Any]:
    uploaded = client.files.create(file=("chat.jsonl", data, "application/jsonl"), purpose="fine-tune")
    base = client.models.list().data[0].id
    start = time.monotonic()
    job = client.fine_tuning.jobs.create(model=base, training_file=uploaded.id)
    deadline = start + 1800
    run_dir = storage / "runs" / job.id
    first = first_step_at(run_dir / "metrics.jsonl", deadline)
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in (
        "succeeded",
        "failed",
        "cancelled",
    ):
        time.sleep(0.05)
    end = time.monotonic()
    assert job.status == "succeeded", job
    return {"first_step_s": first - start, "total_s": end - start, "run_dir": str(run_dir)}


def timed_train(config: Path, out: Path) -> dict[str, Any]:
    start = time.monotonic()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tunesmith",
            "train",
            str(config),
            f"output.dir={out}",
            "output.overwrite=true",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    first = first_step_at(out / "metrics.jsonl", start + 1800)
    assert proc.wait() == 0
    return {"first_step_s": first - start, "total_s": time.monotonic() - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    import openai

    from tunesmith.training.precision_probe import cpu_model_name

    work = Path(tempfile.mkdtemp(prefix="job-overhead-"))
    defaults = work / "defaults.yaml"
    defaults.write_text(f"train:\n  max_steps: {args.steps}\n  save_every: 1000\n", encoding="utf-8")
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "serve", "default", "--storage", str(work / "storage"),
         "--port", str(port), "--job-defaults", str(defaults)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise
                time.sleep(0.5)
        data = "".join(
            json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            + "\n"
            for q, a in ROWS
        ).encode()
        jobs, trains = [], []
        for repeat in range(args.repeats):
            jobs.append(timed_job(client, work / "storage", data))
            config = Path(jobs[-1]["run_dir"]) / "config.yaml"
            trains.append(timed_train(config, work / f"bare-{repeat}"))
    finally:
        server.terminate()
        server.wait(timeout=60)

    def med(rows: list[dict[str, Any]], key: str) -> float:
        return round(statistics.median(r[key] for r in rows), 2)

    print(
        json.dumps(
            {
                "cpu": cpu_model_name(),
                "steps": args.steps,
                "repeats": args.repeats,
                "job": {"first_step_s": med(jobs, "first_step_s"), "total_s": med(jobs, "total_s")},
                "bare_train": {
                    "first_step_s": med(trains, "first_step_s"),
                    "total_s": med(trains, "total_s"),
                },
                "overhead_s": {
                    "to_first_step": round(med(jobs, "first_step_s") - med(trains, "first_step_s"), 2),
                    "total": round(med(jobs, "total_s") - med(trains, "total_s"), 2),
                },
                "each": {"job": jobs, "bare_train": trains},
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
