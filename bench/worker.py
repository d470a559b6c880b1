"""One benchmark run of one tool, in its own process: `python bench/worker.py SPEC.json RESULT.json`.

`bench/run.py` writes SPEC (tool, workload, model dir, data, hyperparameters) and reads RESULT:
per-step losses with cumulative real tokens and wall times, the training time, the peak RSS of
this process, and the loss on a held-out set computed the same way for every tool.

Timing covers the training loop only (first step's data fetch to the end of the last optimizer
step): model loading, tokenization, packing and saving are excluded for every tool alike, and
reported separately as `wall_s` (the whole process).
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

PROCESS_START = time.perf_counter()

import torch  # noqa: E402

IGNORE_INDEX = -100


class CpuClock:
    """Samples (wall, process CPU time) every 20 ms, to read the CPU seconds of any wall interval.

    CPU time counts every thread of the process; on a shared machine it is less disturbed than wall
    time by other processes (though OpenMP threads that spin while waiting still count).
    """

    def __init__(self) -> None:
        import threading

        self.samples: list[tuple[float, float]] = []
        self.rss: list[int] = []  # resident bytes at each sample, for the peak of any interval
        self._page = os.sysconf("SC_PAGE_SIZE")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.perf_counter(), time.process_time()))
            self.rss.append(self._resident_bytes())
            self._stop.wait(0.02)

    def _resident_bytes(self) -> int:
        with open("/proc/self/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * self._page

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_at(self, wall: float) -> float:
        import bisect

        i = bisect.bisect_left(self.samples, (wall, -1.0))
        if i <= 0:
            return self.samples[0][1]
        if i >= len(self.samples):
            return self.samples[-1][1]
        (w0, c0), (w1, c1) = self.samples[i - 1], self.samples[i]
        return c0 + (c1 - c0) * (wall - w0) / max(w1 - w0, 1e-9)

    def cpu_between(self, start: float, end: float) -> float:
        return self.cpu_at(end) - self.cpu_at(start)

    def peak_rss_between(self, start: float, end: float) -> int:
        """Highest sampled resident memory in [start, end] (20 ms sampling: a shorter spike may be missed)."""
        inside = [r for (w, _), r in zip(self.samples, self.rss, strict=False) if start <= w <= end]
        return max(inside, default=0)

    def rss_by_phase(self, loop_start: float, first_step_end: float, end: float) -> dict[str, int]:
        """Peak resident memory before the training loop (imports, model load, data), during its
        first step, and over the remaining steps, so that a regression points at its phase."""
        return {
            "setup": self.peak_rss_between(0.0, loop_start),
            "first_step": self.peak_rss_between(loop_start, first_step_end),
            "steady": self.peak_rss_between(first_step_end, end),
        }


CLOCK: CpuClock | None = None


def source_fingerprint() -> dict[str, str]:
    """Which tunesmith sources this run used: git HEAD and a hash of src/tunesmith/**/*.py as on disk.

    Other people edit src/ while benchmarks run; runs with different fingerprints measured different code.
    """
    import hashlib
    import subprocess

    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / "src" / "tunesmith").rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode())
        digest.update(path.read_bytes())
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        head = ""
    return {"git_head": head, "src_sha256": digest.hexdigest()[:16]}


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def load_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- held-out loss


@torch.no_grad()
def heldout_loss(model: torch.nn.Module, samples: list[dict[str, list[int]]]) -> float:
    """Mean next-token CE over the labelled tokens of the held-out samples, one sample at a time."""
    model.eval()
    total, count = 0.0, 0
    for s in samples:
        ids = torch.tensor([s["input_ids"]])
        labels = torch.tensor([s["labels"]])
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        if keep.any():
            total += float(torch.nn.functional.cross_entropy(logits[keep], targets[keep], reduction="sum"))
            count += int(keep.sum())
    return total / max(count, 1)


def lora_config(spec: dict[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=spec["lora_r"],
        lora_alpha=spec["lora_alpha"],
        lora_dropout=0.0,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )


def load_hf_model(spec: dict[str, Any]) -> Any:
    from transformers import AutoModelForCausalLM

    # transformers' default attention on CPU is sdpa; fp32 as on every tool here.
    return AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32)


# ----------------------------------------------------------------------------- tunesmith


def run_tunesmith(spec: dict[str, Any], packing: bool = True) -> dict[str, Any]:
    """tunesmith as a user runs it; packing=False (one sample per row, batch of samples) is the parity check
    against the Trainer: the same samples per step as it, so the per-step losses should coincide."""
    import tunesmith
    import tunesmith.training.loop as loop

    loop_start: list[float] = []
    original_run = loop.Trainer.run

    def timed_run(self: Any, *args: Any, **kwargs: Any) -> Any:  # only notes when the loop starts
        loop_start.append(time.perf_counter())
        return original_run(self, *args, **kwargs)

    loop.Trainer.run = timed_run

    adapter = (
        {
            "type": "lora",
            "r": spec["lora_r"],
            "alpha": spec["lora_alpha"],
            "dropout": 0.0,
            "targets": "all-linear",
        }
        if spec["workload"] == "lora"
        else {"type": "full"}
    )
    cfg = {
        "model": "default",
        "method": "sft",
        "adapter": adapter,
        "data": {
            "train": [{"path": spec["train_jsonl"], "format": "messages"}],
            "seq_len": spec["seq_len"],
            "packing": packing,
        },
        "train": {
            "epochs": 1,
            "batch_size": spec["rows_per_step"] if packing else spec["samples_per_step"],
            "grad_accum": 1,
            "lr": spec["lr"],
            "weight_decay": 0.0,
            "warmup_ratio": 0.0,
            "scheduler": "constant",
            "max_grad_norm": 1.0,
            "seed": spec["seed"],
            "log_every": 1,
            "precision": {"fp32": "fp32", "bf16": "bf16", "default": "auto"}[spec["precision"]],
            "save_total_limit": 1,
        },
        "output": {"dir": str(Path(spec["work_dir"]) / "run"), "overwrite": True},
    }
    run_dir = Path(tunesmith.train(cfg, show_progress=False))
    rss = peak_rss_bytes()
    rows = [r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    steps = [
        {
            "step": r["step"],
            "loss": r["loss"],
            "tokens": r["tokens"],
            "trained_tokens": r["trained_tokens"],
            "elapsed_s": r["elapsed_s"],
        }
        for r in rows
    ]
    assert CLOCK is not None
    cpu_s = CLOCK.cpu_between(loop_start[0], loop_start[0] + steps[-1]["elapsed_s"])
    phases = CLOCK.rss_by_phase(
        loop_start[0], loop_start[0] + steps[0]["elapsed_s"], loop_start[0] + steps[-1]["elapsed_s"]
    )

    # Held-out loss from the files the run left behind (what a user would load).
    model = load_hf_model(spec)
    if spec["workload"] == "lora":
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, run_dir / "adapter")
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(run_dir / "model", dtype=torch.float32)
    import yaml

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text(encoding="utf-8"))
    return {
        "steps": steps,
        "train_s": steps[-1]["elapsed_s"],
        "cpu_s": cpu_s,
        "peak_rss": rss,
        "rss_by_phase": phases,
        "model": model,
        "resolved_train_config": resolved.get("train"),
    }


# ----------------------------------------------------------------------------- HF Trainer / TRL


class StepRecorder:
    """Wraps a collator to count real tokens per batch, and records per-step loss and time."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.batch_tokens: list[int] = []
        self.batch_trained: list[int] = []

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collator(features)
        self.batch_tokens.append(sum(len(f["input_ids"]) for f in features))
        self.batch_trained.append(int((batch["labels"][:, 1:] != IGNORE_INDEX).sum()))
        return batch


def make_callback(recorder: StepRecorder, out: dict[str, Any]) -> Any:
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            out["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            out.setdefault("ends", []).append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):  # noqa: ANN001
            if logs and "loss" in logs:
                out.setdefault("losses", {})[state.global_step] = float(logs["loss"])

    return Timing()


def steps_from_record(rec: dict[str, Any], recorder: StepRecorder) -> list[dict[str, Any]]:
    steps, tokens, trained = [], 0, 0
    for i, end in enumerate(rec["ends"]):
        tokens += recorder.batch_tokens[i]  # batches are consumed in order, one per optimizer step
        trained += recorder.batch_trained[i]
        steps.append(
            {
                "step": i + 1,
                "loss": rec["losses"].get(i + 1),
                "tokens": tokens,
                "trained_tokens": trained,
                "elapsed_s": round(end - rec["t0"], 3),
            }
        )
    return steps


def train_cpu_s(rec: dict[str, Any]) -> float:
    assert CLOCK is not None
    return CLOCK.cpu_between(rec["t0"], rec["ends"][-1])


def common_args(spec: dict[str, Any], batch_size: int, trl_defaults: bool = False) -> dict[str, Any]:
    return {
        "output_dir": str(Path(spec["work_dir"]) / "out"),
        "per_device_train_batch_size": batch_size,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "learning_rate": spec["lr"],
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "seed": spec["seed"],
        "use_cpu": True,
        # Trainer: bf16=False is its default; SFTConfig defaults to bf16=True
        "bf16": spec["precision"] == "bf16" or (spec["precision"] == "default" and trl_defaults),
        "fp16": False,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
    }


def hf_result(rec: dict[str, Any], recorder: StepRecorder, model: Any) -> dict[str, Any]:
    """What a Trainer-based run reports, read right after `trainer.train()` (peak RSS included)."""
    rss = peak_rss_bytes()
    steps = steps_from_record(rec, recorder)
    assert CLOCK is not None
    return {
        "steps": steps,
        "train_s": steps[-1]["elapsed_s"],
        "cpu_s": train_cpu_s(rec),
        "peak_rss": rss,
        "rss_by_phase": CLOCK.rss_by_phase(rec["t0"], rec["ends"][0], rec["ends"][-1]),
        "model": model,
    }


def run_trainer(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_hf_model(spec)
    if spec["workload"] == "lora":
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(spec))
    samples = load_json(spec["train_tokenized"])
    dataset = Dataset.from_list(
        [
            {"input_ids": s["input_ids"], "attention_mask": [1] * len(s["input_ids"]), "labels": s["labels"]}
            for s in samples
        ]
    )
    recorder = StepRecorder(DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX))
    rec: dict[str, Any] = {}
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**common_args(spec, spec["samples_per_step"])),
        train_dataset=dataset,
        data_collator=recorder,
        callbacks=[make_callback(recorder, rec)],
    )
    trainer.train()
    return hf_result(rec, recorder, model)


def run_trl(spec: dict[str, Any]) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.manual_seed(spec["seed"])
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = load_hf_model(spec)
    samples = load_json(spec["train_tokenized"])
    # Pre-tokenized with the same labels as every other tool (assistant tokens only); TRL packs
    # these with best-fit decreasing into rows of max_length and trains padding-free.
    dataset = Dataset.from_list([{"input_ids": s["input_ids"], "labels": s["labels"]} for s in samples])
    args = SFTConfig(
        **common_args(spec, spec["rows_per_step"], trl_defaults=True),
        max_length=spec["seq_len"],
        packing=True,
        packing_strategy="bfd",
        # SFTConfig defaults to True; off, as for every other tool, unless its defaults are asked for
        gradient_checkpointing=spec["precision"] == "default",
    )
    rec: dict[str, Any] = {}
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=lora_config(spec) if spec["workload"] == "lora" else None,
    )
    recorder = StepRecorder(trainer.data_collator)
    trainer.data_collator = recorder
    trainer.add_callback(make_callback(recorder, rec))
    trainer.train()
    return {**hf_result(rec, recorder, trainer.model), "packed_rows": len(trainer.train_dataset)}


def run_base(spec: dict[str, Any]) -> dict[str, Any]:
    """No training: the held-out loss of the untouched model, for reference."""
    return {
        "steps": [],
        "train_s": 0.0,
        "cpu_s": 0.0,
        "peak_rss": peak_rss_bytes(),
        "model": load_hf_model(spec),
    }


def run_tunesmith_nopack(spec: dict[str, Any]) -> dict[str, Any]:
    return run_tunesmith(spec, packing=False)


TOOLS = {
    "tunesmith": run_tunesmith,
    "tunesmith_nopack": run_tunesmith_nopack,
    "trainer": run_trainer,
    "trl": run_trl,
    "base": run_base,
}


def main() -> None:
    spec_path, result_path = sys.argv[1], sys.argv[2]
    spec = load_json(spec_path)
    os.makedirs(spec["work_dir"], exist_ok=True)
    global CLOCK
    fingerprint = source_fingerprint()  # before importing tunesmith: what the imports will read
    CLOCK = CpuClock()
    result = TOOLS[spec["tool"]](spec)
    CLOCK.stop()
    model = result.pop("model")
    t = time.perf_counter()
    result["heldout_loss"] = heldout_loss(model, load_json(spec["eval_tokenized"]))
    result["heldout_s"] = round(time.perf_counter() - t, 2)
    result["wall_s"] = round(time.perf_counter() - PROCESS_START, 2)
    result["torch_threads"] = torch.get_num_threads()
    result["source"] = fingerprint
    if source_fingerprint() != fingerprint:
        result["source_changed_during_run"] = True
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")


if __name__ == "__main__":
    main()
