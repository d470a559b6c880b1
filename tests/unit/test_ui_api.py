"""The web UI's server side (`/ui`, `/ui/api/...`) with FastAPI's TestClient, without a browser.

The job service here never starts its queue, so jobs stay queued and the tests set a job's events
and state in the database themselves: what the routes must show is then known exactly. Checked
against independent references: the job a YAML creates runs with the config that YAML says (read
back from the job's own config file), the Data page's trained runs are the tokens whose labels are
not masked in `build_data`'s own output, and the event stream gives every event once, in order,
also when resumed with `Last-Event-ID`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import IDENTITY_ROWS
from tunesmith.jobs.events import add_event
from tunesmith.jobs.store import now

pytest.importorskip("fastapi")
pytest.importorskip("httpx")

KEY = "ui-key-7"
DEFAULTS = {"data": {"seq_len": 128, "packing": False}, "train": {"precision": "fp32", "log_every": 1}}


def chat_jsonl(pairs: list[tuple[str, str]]) -> bytes:
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs
    ]
    return "".join(json.dumps(row) + "\n" for row in rows).encode()


@pytest.fixture(scope="module")
def ui(tiny_model_dirs, tmp_path_factory):
    from fastapi.testclient import TestClient

    from tunesmith.serve.adapters import load_model_set
    from tunesmith.serve.app import create_app
    from tunesmith.serve.engine import Engine
    from tunesmith.serve.fine_tuning_api import create_job_service
    from tunesmith.serve.settings import ServeSettings

    storage = tmp_path_factory.mktemp("ui-storage")
    models = load_model_set(str(tiny_model_dirs["llama"]), max_context=256)
    engine = Engine(models.model, max_context=models.context_length, max_batch=2)
    service = create_job_service(storage, engine, models, defaults=DEFAULTS)  # queue not started
    app = create_app(engine, models, ServeSettings(api_key=KEY, max_tokens=16), service)
    client = TestClient(app)
    client.headers["Authorization"] = f"Bearer {KEY}"
    yield {"client": client, "service": service, "models": models}
    client.close()
    service.store.close()
    engine.close()


def upload(client: Any, data: bytes, name: str = "train.jsonl") -> dict[str, Any]:
    response = client.post("/v1/files", files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert response.status_code == 200, response.text
    return response.json()


def test_the_page_and_its_files_need_no_key_but_the_api_does(ui):
    from fastapi.testclient import TestClient

    anonymous = TestClient(ui["client"].app)
    page = anonymous.get("/ui")
    assert page.status_code == 200 and "<title>tunesmith</title>" in page.text
    for name in ("app.js", "app.css", "chart.js"):
        assert anonymous.get(f"/ui/static/{name}").status_code == 200
        assert f"/ui/static/{name}" in page.text
    assert anonymous.get("/ui/static/ui_api.py").status_code == 401  # only the listed files are open
    assert ui["client"].get("/ui/static/ui_api.py").status_code == 404  # and only they are served
    refused = anonymous.get("/ui/api/info")
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert anonymous.get("/ui/api/jobs").status_code == 401


def test_info_carries_the_form_from_the_config_schema(ui):
    from tunesmith.config.schema import TrainConfig

    info = ui["client"].get("/ui/api/info").json()
    assert info["base"] == ui["models"].base_name and info["key_required"] is True
    fields = {f["key"]: f for f in info["form"]["fields"]}
    assert fields["train.lr"]["default"] == TrainConfig.model_fields["lr"].default
    assert fields["data.packing"]["help"] == "padding-free packing of samples into rows of seq_len"
    assert fields["train.save_every"]["schema"]["anyOf"][1]["type"] == "null"
    assert yaml.safe_load(info["yaml"])["data"]["seq_len"] == 128  # the server's job defaults show


def test_a_yaml_becomes_a_job_that_runs_with_that_config(ui):
    client, service = ui["client"], ui["service"]
    training = upload(client, chat_jsonl(IDENTITY_ROWS * 2))
    text = yaml.safe_dump(
        {
            "model": ui["models"].base_name,
            "method": "sft",
            "data": {"train": [{"path": training["id"]}], "seq_len": 64},
            "adapter": {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1},
            "train": {"epochs": 2, "batch_size": 3, "lr": 0.003, "max_steps": 5, "seed": 11},
        }
    )
    response = client.post("/ui/api/jobs", json={"yaml": text, "suffix": "from-ui"})
    assert response.status_code == 200, response.text
    job = response.json()
    assert job["status"] == "queued" and job["user_provided_suffix"] == "from-ui"
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 1.0}
    assert job["seed"] == 11 and job["training_file"] == training["id"]
    config = yaml.safe_load(Path(service.job(job["id"])["config_path"]).read_text())
    assert config["adapter"] == {"type": "lora", "r": 4, "alpha": 8, "dropout": 0.1}
    assert config["train"]["lr"] == 0.003 and config["train"]["max_steps"] == 5
    assert config["train"]["precision"] == "fp32"  # the server's defaults stay under the page's keys
    assert config["data"]["seq_len"] == 64 and config["data"]["packing"] is False
    assert config["data"]["train"] == [{"path": service.file(training["id"])["path"]}]
    assert service.defaults == DEFAULTS  # one job's settings do not leak into the service
    listed = client.get("/v1/fine_tuning/jobs").json()["data"]
    assert job["id"] in [j["id"] for j in listed]  # the OpenAI face sees the same job
    detail = client.get(f"/ui/api/jobs/{job['id']}").json()
    assert yaml.safe_load(detail["config_yaml"]) == config and detail["metrics"] == []


@pytest.mark.parametrize(
    ("change", "param", "words"),
    [
        ({"model": "other-model"}, "model", "fine-tunes the base it serves"),
        ({"output": {"dir": "/tmp/x"}}, "output", "run directory"),
        ({"method": "kto"}, "method", "sft or dpo"),
        ({"data": {"train": [{"path": "/etc/passwd"}]}}, "data.train", "uploaded file id"),
        ({"train": {"epochs": 1.5}}, "train.epochs", "whole number"),
        ({"adapter": {"type": "lora", "r": 0}}, None, "adapter.r"),
    ],
)
def test_a_bad_yaml_is_a_400_naming_the_key(ui, change, param, words):
    training = upload(ui["client"], chat_jsonl(IDENTITY_ROWS * 2))
    config: dict[str, Any] = {
        "model": ui["models"].base_name,
        "data": {"train": [{"path": training["id"]}]},
        "train": {"epochs": 1},
    }
    config.update(change)
    before = len(ui["service"].store.select("jobs"))
    response = ui["client"].post("/ui/api/jobs", json={"yaml": yaml.safe_dump(config)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert words in error["message"]
    if param is not None:
        assert error["param"] == param
    assert len(ui["service"].store.select("jobs")) == before


def test_yaml_that_does_not_parse_is_a_400(ui):
    response = ui["client"].post("/ui/api/jobs", json={"yaml": "model: [unclosed"})
    assert response.status_code == 400 and "does not parse" in response.json()["error"]["message"]


def test_data_preview_marks_the_trained_tokens_and_names_bad_rows(ui, tokenizer):
    from tunesmith.config.schema import DataConfig, DataSource
    from tunesmith.data.build import build_data
    from tunesmith.data.tokenize import IGNORE_INDEX

    good = chat_jsonl(IDENTITY_ROWS[:3])
    bad = b'{"messages": [{"role": "user", "content": "no answer"}]}\n{not json\n'
    row = upload(ui["client"], good + bad, "mixed.jsonl")
    response = ui["client"].post("/ui/api/data/preview", json={"file_id": row["id"], "seq_len": 128})
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["rows"] == 5 and result["good_rows"] == 3 and result["issue_count"] == 2
    assert [issue.split(":")[:2] for issue in result["issues"]] == [
        ["mixed.jsonl", "4"],
        ["mixed.jsonl", "5"],
    ]
    path = ui["service"].file(row["id"])["path"]
    reference = build_data(
        DataConfig(
            train=[DataSource(path=path)],
            seq_len=128,
            packing=False,
            on_error="skip",
            shuffle=False,
            cache=False,
        ),
        ui["models"].served[ui["models"].base_name].tokenizer,
        "sft",
    )
    for shown, sample in zip(result["samples"], reference.train, strict=True):
        trained = [
            t for t, label in zip(sample.input_ids, sample.labels, strict=True) if label != IGNORE_INDEX
        ]
        text = "".join(run["text"] for run in shown["runs"] if run["trained"])
        assert text == tokenizer.decode(
            trained, skip_special_tokens=False, clean_up_tokenization_spaces=False
        )
        assert shown["trained"] == len(trained) > 0
    assert "My name is Quill." in "".join(
        run["text"] for run in result["samples"][0]["runs"] if run["trained"]
    )


def _queued_job(ui) -> dict[str, Any]:
    training = upload(ui["client"], chat_jsonl(IDENTITY_ROWS * 2))
    text = yaml.safe_dump({"model": ui["models"].base_name, "data": {"train": [{"path": training["id"]}]}})
    return ui["client"].post("/ui/api/jobs", json={"yaml": text}).json()


def read_sse(response: Any) -> list[tuple[str, Any, int | None]]:
    messages, kind, data, id = [], None, None, None
    for line in response.iter_lines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
        elif line.startswith("id: "):
            id = int(line[4:])
        elif line == "" and kind is not None:
            messages.append((kind, data, id))
            kind, data, id = None, None, None
    return messages


def test_the_stream_replays_every_event_in_order_and_ends_with_the_job(ui):
    client, store = ui["client"], ui["service"].store
    job = _queued_job(ui)
    run_dir = Path(store.get("jobs", job["id"])["run_dir"])
    run_dir.mkdir(parents=True)
    losses = [2.0, 1.5, 1.25]
    with open(run_dir / "metrics.jsonl", "w") as handle:
        for step, loss in enumerate(losses, 1):
            data = {"step": step, "train_loss": loss}
            add_event(store, job["id"], f"Step {step}", type="metrics", data=data)
            handle.write(json.dumps({"step": step, "epoch": step / 6, "loss": loss}) + "\n")
    logs = store.root / "logs"
    logs.mkdir(exist_ok=True)
    (logs / f"{job['id']}.log").write_text("step 1/6  loss 2.0\n")
    store.update("jobs", job["id"], status="succeeded", finished_at=now(), fine_tuned_model="ft:x")
    add_event(store, job["id"], "The job has successfully completed")

    with client.stream("GET", f"/ui/api/jobs/{job['id']}/stream") as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        messages = read_sse(response)
    kinds = [m[0] for m in messages]
    assert kinds[0] == "job" and kinds[-1] == "end" and messages[-1][1]["status"] == "succeeded"
    assert messages[0][1]["status"] == "succeeded" and messages[0][1]["progress"]["fraction"] == 1.0
    events = [m for m in messages if m[0] == "event"]
    expected = [e for e in store.select("events", "job_id = ?", (job["id"],))]
    assert [e[1]["id"] for e in events] == [e["id"] for e in expected]
    assert [e[2] for e in events] == [e["seq"] for e in expected]
    assert [e[1]["data"]["train_loss"] for e in events if e[1]["type"] == "metrics"] == losses
    assert "".join(m[1]["text"] for m in messages if m[0] == "log") == "step 1/6  loss 2.0\n"

    middle = events[len(events) // 2][2]
    with client.stream(
        "GET", f"/ui/api/jobs/{job['id']}/stream", headers={"Last-Event-ID": str(middle)}
    ) as response:
        resumed = [m for m in read_sse(response) if m[0] == "event"]
    assert [e[2] for e in resumed] == [e["seq"] for e in expected if e["seq"] > middle]

    detail = client.get(f"/ui/api/jobs/{job['id']}").json()
    assert [m["loss"] for m in detail["metrics"]] == losses


def test_progress_follows_the_last_logged_step(ui):
    store = ui["service"].store
    job = _queued_job(ui)
    row = store.get("jobs", job["id"])
    config = yaml.safe_load(Path(row["config_path"]).read_text())
    epochs = config["train"]["epochs"]
    Path(row["run_dir"]).mkdir(parents=True)
    with open(Path(row["run_dir"]) / "metrics.jsonl", "w") as handle:
        handle.write(json.dumps({"step": 3, "epoch": epochs / 4, "loss": 1.0}) + "\n")
    listed = {j["id"]: j for j in ui["client"].get("/ui/api/jobs").json()["data"]}
    assert listed[job["id"]]["progress"]["fraction"] == pytest.approx(0.25)


def test_export_refuses_a_job_that_has_not_succeeded(ui):
    job = _queued_job(ui)
    response = ui["client"].post(f"/ui/api/jobs/{job['id']}/exports", json={"kind": "merge"})
    assert response.status_code == 400 and "only a succeeded job" in response.json()["error"]["message"]
    assert ui["client"].get(f"/ui/api/jobs/{job['id']}/exports").json() == {"data": []}
    assert ui["client"].get("/ui/api/jobs/ftjob-nope/exports").status_code == 404


def test_ui_without_a_key_refuses_to_bind_beyond_this_machine(monkeypatch, capsys):
    from tunesmith.cli.main import main

    monkeypatch.delenv("TUNESMITH_API_KEY", raising=False)
    assert main(["ui", "--host", "0.0.0.0", "--no-browser"]) == 2
    error = capsys.readouterr().err
    assert "binds to 127.0.0.1 only" in error and "--api-key" in error


def test_ui_defaults_to_the_embedded_model_and_local_storage():
    from tunesmith.cli.main import _build_parser

    args = _build_parser().parse_args(["ui"])
    assert (args.model, args.storage, args.host, args.no_browser) == (
        "default",
        "./tunesmith-data",
        "127.0.0.1",
        False,
    )
