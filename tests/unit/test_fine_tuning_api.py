"""The job service's OpenAI faces (Files and Fine-tuning), driven with the official `openai` client
against an in-process server on a tiny random model, with real `tunesmith train` child processes.

Checked against independent references: a job's metrics events carry the losses of its run's own
metrics.jsonl, its checkpoints are the run's committed checkpoint directories, paging through small
pages gives exactly the one large page, and the `ft:` model answers as transformers + PEFT do with
the job's adapter loaded separately. Bad files fail the job with OpenAI's codes; a cancel leaves a
checkpoint at the step it stopped and no child behind; pause/resume continues the run exactly where
it stopped; a restart settles jobs a previous server left running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import IDENTITY_ROWS
from tunesmith.jobs.service import Base, JobService
from tunesmith.jobs.store import Store, now
from tunesmith.serve.adapters import load_model_set
from tunesmith.serve.engine import Engine
from tunesmith.serve.server import ServerThread
from tunesmith.serve.settings import ServeSettings

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

KEY = "jobs-key-42"
JOB_DEFAULTS = {
    "data": {"seq_len": 128, "packing": False},  # one example per batch row: OpenAI's batch_size
    "adapter": {"r": 4, "alpha": 8},
    "train": {"save_every": 2, "log_every": 1, "precision": "fp32", "warmup_ratio": 0.0},
}
ROWS = IDENTITY_ROWS * 2  # 16 examples: 8 steps per epoch at batch size 2
QUESTION = "What is your name?"


def jsonl(rows: list[Any]) -> bytes:
    return "".join(json.dumps(row) + "\n" for row in rows).encode("utf-8")


def chat_rows(pairs: list[tuple[str, str]]) -> list[dict[str, Any]]:
    return [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    from tunesmith.serve.app import create_app
    from tunesmith.serve.fine_tuning_api import create_job_service

    storage = tmp_path_factory.mktemp("storage")
    base = tiny_model_dirs["llama"]
    models = load_model_set(str(base), max_context=512)
    engine = Engine(models.model, max_context=models.context_length, max_batch=4)
    service = create_job_service(storage, engine, models, defaults=JOB_DEFAULTS, grace_s=60).start()
    settings = ServeSettings(api_key=KEY, max_tokens=64)
    with ServerThread(create_app(engine, models, settings, service)) as thread:
        yield {"url": thread.url, "service": service, "models": models, "base": base, "storage": storage}
    service.close()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def upload(client: Any, data: bytes, name: str = "train.jsonl") -> Any:
    return client.files.create(file=(name, data, "application/jsonl"), purpose="fine-tune")


def wait_for(client: Any, job_id: str, statuses: tuple[str, ...], timeout: float = 600) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.fine_tuning.jobs.retrieve(job_id)
        if job.status in statuses:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} is still {job.status}")


def wait_for_step(server: dict[str, Any], job_id: str, step: int, timeout: float = 600) -> None:
    metrics = Path(server["service"].job(job_id)["run_dir"]) / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and len(metrics.read_text(encoding="utf-8").splitlines()) >= step:
            return
        time.sleep(0.1)
    raise AssertionError(f"job {job_id} never reached step {step}")


def run_metrics(server: dict[str, Any], job_id: str) -> list[dict[str, Any]]:
    path = Path(server["service"].job(job_id)["run_dir"]) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


# -- files ------------------------------------------------------------------------------------------


def test_upload_is_stored_under_a_generated_id_and_read_back(client, server):
    data = jsonl(chat_rows(ROWS))
    uploaded = upload(client, data, name="../../outside.jsonl")
    assert uploaded.id.startswith("file-") and uploaded.status == "processed"
    assert (uploaded.bytes, uploaded.filename, uploaded.purpose) == (len(data), "outside.jsonl", "fine-tune")
    stored = sorted(p.name for p in (server["storage"] / "files").iterdir())
    assert f"{uploaded.id}.jsonl" in stored and "outside.jsonl" not in stored
    assert not (server["storage"].parent / "outside.jsonl").exists()
    assert client.files.content(uploaded.id).read() == data
    assert client.files.retrieve(uploaded.id).id == uploaded.id
    assert uploaded.id in [f.id for f in client.files.list()]
    assert client.files.delete(uploaded.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(uploaded.id)


def test_a_file_with_bad_lines_names_them(client):
    rows = chat_rows(ROWS[:11])
    lines = [json.dumps(r) for r in rows]
    lines[2] = json.dumps({"messages": [{"role": "user", "content": "no answer here"}]})
    lines[5] = '{"messages": [broken'
    uploaded = upload(client, ("\n".join(lines) + "\n").encode())
    assert uploaded.status == "error"
    assert "line 3: messages: no assistant message" in uploaded.status_details
    assert "line 6: invalid JSON" in uploaded.status_details
    not_utf8 = upload(client, jsonl(rows[:3]) + b'{"text": "caf\xe9"}\n')
    assert not_utf8.status == "error" and "line 4: not UTF-8" in not_utf8.status_details


@pytest.mark.parametrize(
    "rows, code, words",
    [
        (
            chat_rows(ROWS[:7]),
            "invalid_n_examples",
            "Training file has 7 example(s), but must have at least 10",
        ),
        (
            chat_rows(ROWS[:11]) + [{"messages": [{"role": "user", "content": "hi"}]}],
            "invalid_training_file",
            "line 12: messages: no assistant message",
        ),
        (chat_rows(ROWS[:11]), "invalid_training_file", "line 4: invalid JSON"),
    ],
    ids=["seven-rows", "no-assistant", "bad-json"],
)
def test_a_bad_training_file_fails_the_job_with_openais_code(client, server, rows, code, words):
    data = jsonl(rows)
    if code == "invalid_training_file" and "JSON" in words:
        lines = data.decode().splitlines()
        lines[3] = "{not json"
        data = ("\n".join(lines) + "\n").encode()
    file = upload(client, data)
    job = client.fine_tuning.jobs.create(model=server["models"].base_name, training_file=file.id)
    assert job.status == "failed" and job.error.code == code and job.error.param == "training_file"
    assert words in job.error.message
    assert server["service"].job(job.id)["pid"] is None  # nothing was trained
    assert any(words in e.message and e.level == "error" for e in client.fine_tuning.jobs.list_events(job.id))


def test_validation_errors_are_400_unknown_ids_404_and_a_bad_key_401(client, server):
    file = upload(client, jsonl(chat_rows(ROWS)))
    base = server["models"].base_name
    cases = [
        ({"model": "gpt-4o-mini", "training_file": file.id}, "model"),
        ({"model": base, "training_file": "file-nope"}, "training_file"),
        ({"model": base, "training_file": file.id, "suffix": "a/b"}, "suffix"),
        ({"model": base, "training_file": file.id, "hyperparameters": {"n_epochs": 0}}, "hyperparameters"),
        ({"model": base, "training_file": file.id, "method": {"type": "reinforcement"}}, "method"),
    ]
    before = len(server["service"].store.select("jobs"))
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.fine_tuning.jobs.create(**body)
        assert caught.value.status_code == 400 and caught.value.body["param"].startswith(param), body
    assert len(server["service"].store.select("jobs")) == before  # a refused request persists nothing
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.retrieve("ftjob-unknown")
    with pytest.raises(openai.NotFoundError):
        client.fine_tuning.jobs.list_events("ftjob-unknown")
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.list(after="ftjob-unknown")
    with pytest.raises(openai.BadRequestError):
        client.files.create(file=("x.jsonl", b"{}\n", "application/jsonl"), purpose="assistants")
    wrong = openai.OpenAI(base_url=server["url"] + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.fine_tuning.jobs.list()
    assert caught.value.code == "invalid_api_key"


# -- jobs -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_job_trains_lists_its_events_and_checkpoints_and_serves_its_model(client, server):
    file = upload(client, jsonl(chat_rows(ROWS)))
    created = client.fine_tuning.jobs.create(
        model=server["models"].base_name,
        training_file=file.id,
        suffix="quill",
        seed=7,
        metadata={"team": "docs"},
        method={
            "type": "supervised",
            "supervised": {
                "hyperparameters": {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 5}
            },
        },
    )
    assert created.status in ("queued", "running") and created.seed == 7
    assert (created.hyperparameters.n_epochs, created.hyperparameters.batch_size) == (1, 2)
    config = Path(server["service"].job(created.id)["config_path"]).read_text(encoding="utf-8")
    assert "lr: 0.001" in config  # 5 x the default learning rate 2e-4
    job = wait_for(client, created.id, ("succeeded", "failed", "cancelled"))
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:{server['models'].base_name}:tunesmith:quill:{job.id[6:]}"
    assert "/" not in job.fine_tuned_model and job.finished_at >= job.created_at
    metrics = run_metrics(server, job.id)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    assert job.trained_tokens == metrics[-1]["trained_tokens"]
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "docs"})] == [job.id]

    # events: small pages walk the same list as one large page, newest first
    whole = client.fine_tuning.jobs.list_events(job.id, limit=100)
    assert not whole.has_more
    paged = [e.id for e in client.fine_tuning.jobs.list_events(job.id, limit=3)]  # auto-paging
    assert paged == [e.id for e in whole.data]
    steps = [e for e in reversed(whole.data) if e.type == "metrics"]
    assert [e.data["train_loss"] for e in steps] == [m["loss"] for m in metrics]
    messages = [e.message for e in reversed(whole.data) if e.type == "message"]
    assert (
        messages[0].startswith("Created fine-tuning job")
        and messages[-1] == "The job has successfully completed"
    )
    last = whole.data[-1].id
    empty = client.fine_tuning.jobs.list_events(job.id, after=last)
    assert (empty.data, empty.has_more) == ([], False)

    # checkpoints: the run's committed ones (save_every 2), newest first, one per page
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id, limit=1)
    assert checkpoints.has_more and len(checkpoints.data) == 1
    listed = list(checkpoints)  # follows `after` to the end
    assert [c.step_number for c in listed] == [8, 6, 4, 2]
    assert listed[0].metrics.train_loss == metrics[7]["loss"]
    assert listed[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-8"
    assert client.fine_tuning.jobs.checkpoints.list(job.id, after=listed[-1].id).data == []

    # the model is served at once, and answers as transformers + PEFT do with the run's adapter
    assert job.fine_tuned_model in [m.id for m in client.models.list()]
    answer = client.chat.completions.create(
        model=job.fine_tuned_model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
    )
    reference, base_answer = reference_answers(server["base"], Path(server["service"].job(job.id)["run_dir"]))
    assert answer.choices[0].message.content == reference
    base = client.chat.completions.create(
        model=server["models"].base_name,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=12,
        temperature=0,
    )
    assert base.choices[0].message.content == base_answer


def reference_answers(base_dir: Path, run_dir: Path) -> tuple[str, str]:
    """Greedy answers of the run's adapter and of the bare base, by transformers + PEFT in-process."""
    from peft import PeftModel

    from tunesmith.models.load import load_model, load_tokenizer

    tokenizer = load_tokenizer(run_dir / "adapter")
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    model = PeftModel.from_pretrained(load_model(base_dir, torch.float32, False), run_dir / "adapter").eval()
    stops = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|im_end|>")]

    def greedy() -> str:
        ids = prompt
        out: list[int] = []
        with torch.no_grad():
            for _ in range(12):
                token = int(model(input_ids=ids).logits[0, -1].argmax())
                if token in stops:
                    break
                out.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
        return tokenizer.decode(out, skip_special_tokens=True)

    tuned = greedy()
    with model.disable_adapter():
        bare = greedy()
    return tuned, bare


@pytest.mark.slow
def test_cancel_checkpoints_and_leaves_no_child(client, server):
    file = upload(client, jsonl(chat_rows(ROWS)))
    job = client.fine_tuning.jobs.create(
        model="default" if "default" in server["service"].base.aliases else server["models"].base_name,
        training_file=file.id,
        hyperparameters={"n_epochs": 40, "batch_size": 2},
    )
    wait_for_step(server, job.id, 3)
    pid = server["service"].job(job.id)["pid"]
    assert pid is not None and not pid_gone(pid)
    assert client.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    done = wait_for(client, job.id, ("cancelled", "failed", "succeeded"))
    while server["service"].job(job.id)["status"] == "running":
        time.sleep(0.2)
    record = server["service"].job(job.id)
    assert (done.status, record["status"]) == ("cancelled", "cancelled") and record["finished_at"]
    assert pid_gone(pid) and server["service"].queue.child_pid(job.id) is None
    run_dir = Path(record["run_dir"])
    last_step = run_metrics(server, job.id)[-1]["step"]
    assert json.loads((run_dir / "status.json").read_text())["status"] == "interrupted"
    assert (run_dir / "checkpoints" / f"step-{last_step:08d}" / "state.json").is_file()  # stopped cleanly
    assert last_step < 320
    with pytest.raises(openai.BadRequestError):
        client.fine_tuning.jobs.cancel(job.id)


@pytest.mark.slow
def test_pause_and_resume_continue_the_run_where_it_stopped(client, server):
    file = upload(client, jsonl(chat_rows(ROWS)))
    job = client.fine_tuning.jobs.create(
        model=server["models"].base_name,
        training_file=file.id,
        hyperparameters={"n_epochs": 2, "batch_size": 2},
    )
    wait_for_step(server, job.id, 3)
    client.fine_tuning.jobs.pause(job.id)
    paused = wait_for(client, job.id, ("paused", "failed", "succeeded"))
    assert paused.status == "paused"
    stopped_at = run_metrics(server, job.id)[-1]["step"]
    assert client.fine_tuning.jobs.resume(job.id).status in ("queued", "running")
    done = wait_for(client, job.id, ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    steps = [m["step"] for m in run_metrics(server, job.id)]
    assert steps == list(range(1, 17)) and stopped_at < 16  # no step repeated, none skipped
    events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
    assert f"Fine-tuning job resumed from step {stopped_at}" in events


# -- restart ----------------------------------------------------------------------------------------


def fake_job(store: Store, status: str, pid: int | None, config_path: str) -> str:
    job_id = f"ftjob-{status}{len(store.select('jobs'))}"
    store.insert(
        "jobs",
        {
            "id": job_id,
            "created_at": now(),
            "model": "tiny",
            "training_file": "file-x",
            "method": {"type": "supervised"},
            "hyperparameters": {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0},
            "seed": 0,
            "status": status,
            "run_dir": str(Path(config_path).parent / job_id),
            "config_path": config_path,
            "pid": pid,
        },
    )
    return job_id


@pytest.mark.parametrize("resume", [False, True], ids=["fail", "resume"])
def test_a_restart_settles_jobs_the_last_server_left_running(tmp_path, resume):
    config = str(tmp_path / "job.yaml")
    store = Store(tmp_path)
    # an orphan child still running this job's config (its cmdline holds `train CONFIG`)
    orphan = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)", "train", config], start_new_session=True
    )
    running = fake_job(store, "running", orphan.pid, config)
    queued = fake_job(store, "queued", None, config)
    store.close()
    service = JobService(
        tmp_path, Base("tiny", str(tmp_path)), lambda name, run: None, resume_jobs=resume, grace_s=5
    )
    service.queue.recover()  # what start() does first; the queue thread is not started
    assert orphan.wait(timeout=30) is not None  # the orphan was stopped
    job = service.job(running)
    if resume:
        assert job["status"] == "queued" and job["error"] is None
    else:
        assert job["status"] == "failed" and job["error"]["code"] == "server_restarted"
        assert "--resume-jobs" in job["error"]["message"] and job["finished_at"]
    assert service.job(queued)["status"] == "queued"
    service.store.close()


# -- adapters added while serving -------------------------------------------------------------------


def random_lora(base_dir: Path, out: Path, seed: int) -> Path:
    """A LoRA adapter with random B (trained-looking, in a second), saved as a PEFT directory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    model.save_pretrained(out)
    return out


@pytest.mark.slow
def test_adapters_added_mid_stream_leave_running_requests_untouched(tiny_model_dirs, tmp_path):
    """The first adapter wraps the bare base, the second joins the PeftModel; a base request decoding
    meanwhile gets the same tokens as alone, and each adapter answers as PEFT does in-process."""
    from peft import PeftModel

    from tunesmith.models.load import load_model
    from tunesmith.serve.adapters import add_adapter
    from tunesmith.serve.sampling import SamplingParams

    base = tiny_model_dirs["llama"]
    models = load_model_set(str(base), max_context=256)
    engine = Engine(models.model, max_context=256, max_batch=4)
    prompt = [1, 2, 3, 4, 5]
    greedy = SamplingParams(max_tokens=240, temperature=0.0)
    adapters = {name: random_lora(base, tmp_path / name, seed) for seed, name in ((1, "one"), (2, "two"))}
    try:
        alone = engine.generate(prompt, greedy).tokens
        outputs: list[list[int]] = [[] for _ in range(12)]  # 3 rounds of the 4-row batch
        ended = [threading.Event() for _ in outputs]

        def listener(i: int) -> Any:
            def on_event(event: Any) -> None:
                if event.token is not None:
                    outputs[i].append(event.token)
                if event.finish is not None:
                    ended[i].set()

            return on_event

        for i in range(len(outputs)):
            engine.submit(prompt, greedy, listener(i))
        deadline = time.monotonic() + 60
        while engine.active == 0 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert engine.active > 0  # the adapters arrive while base rows decode (and others wait)
        for name, directory in adapters.items():
            add_adapter(models, engine, name, directory)
        assert all(event.wait(120) for event in ended)
        assert [len(tokens) for tokens in outputs] == [len(alone)] * 12
        assert all(tokens == alone for tokens in outputs)
        short = SamplingParams(max_tokens=8, temperature=0.0)
        for name in ("one", "two"):
            served = engine.generate(prompt, short, models.served[name].adapter).tokens
            reference = PeftModel.from_pretrained(
                load_model(base, torch.float32, False), tmp_path / name
            ).eval()
            ids = torch.tensor([prompt])
            with torch.no_grad():
                for _ in range(8):
                    ids = torch.cat([ids, reference(input_ids=ids).logits[:, -1:].argmax(-1)], dim=1)
            assert served == ids[0, len(prompt) :].tolist(), name
        assert engine.generate(prompt, greedy).tokens == alone  # the base still answers as the bare base
    finally:
        engine.close()
