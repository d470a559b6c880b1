"""The job service's parts without a server: the database (ids, paging, guarded transitions, reopening),
file validation with the data checks, the OpenAI request -> run config mapping, and metrics tailing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.config.load import ConfigError
from tunesmith.config.schema import RunConfig
from tunesmith.jobs.config import RequestError, build_config, model_name, parse_request
from tunesmith.jobs.events import sync_checkpoints, sync_metrics
from tunesmith.jobs.files import check_file
from tunesmith.jobs.store import Store, UnknownCursor, new_id, now


def add_events(store: Store, n: int, job: str = "ftjob-a") -> list[str]:
    ids = [new_id("ftevent-") for _ in range(n)]
    for i, event_id in enumerate(ids):
        row = {
            "id": event_id,
            "job_id": job,
            "created_at": now(),
            "level": "info",
            "message": f"m{i}",
            "type": "message",
        }
        store.insert("events", row)
    return ids


def test_ids_look_like_openais_and_never_hold_a_slash():
    ids = {new_id("ftjob-") for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith("ftjob-") and len(i) == 30 and i[6:].isalnum() for i in ids)


def test_paging_walks_the_list_newest_first_and_ends_with_an_empty_page(tmp_path):
    store = Store(tmp_path)
    ids = add_events(store, 7)
    add_events(store, 3, job="ftjob-other")
    seen, after, pages = [], None, 0
    while True:
        items, more = store.page("events", where="job_id = ?", params=("ftjob-a",), after=after, limit=3)
        seen += [item["id"] for item in items]
        pages += 1
        if not more:
            break
        after = items[-1]["id"]
    assert seen == ids[::-1] and pages == 3
    assert store.page("events", where="job_id = ?", params=("ftjob-a",), after=ids[0], limit=3) == ([], False)
    oldest_first, _ = store.page(
        "events", where="job_id = ?", params=("ftjob-a",), limit=10, newest_first=False
    )
    assert [item["id"] for item in oldest_first] == ids
    other = store.select("events", "job_id = ?", ("ftjob-other",))[0]["id"]
    with pytest.raises(UnknownCursor):  # a cursor from another job's list is not this list's
        store.page("events", where="job_id = ?", params=("ftjob-a",), after=other)


def test_the_database_uses_wal_survives_reopening_and_guards_transitions(tmp_path):
    store = Store(tmp_path)
    row = {
        "id": "ftjob-x",
        "created_at": now(),
        "model": "m",
        "training_file": "file-a",
        "method": {"type": "supervised"},
        "hyperparameters": {"n_epochs": 2},
        "seed": 3,
        "status": "queued",
        "run_dir": "r",
        "config_path": "c",
    }
    store.insert("jobs", row)
    assert store._db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert store.update_if("jobs", "ftjob-x", ("queued",), status="running")
    assert not store.update_if("jobs", "ftjob-x", ("queued",), status="running")  # already taken
    store.close()
    again = Store(tmp_path).get("jobs", "ftjob-x")
    assert again["status"] == "running" and again["hyperparameters"] == {"n_epochs": 2}
    assert again["method"] == {"type": "supervised"}


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def chat(q: str, a: str) -> str:
    return json.dumps({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})


def test_file_checks_use_the_data_checks_and_tell_conversations_from_pairs(tmp_path):
    good = check_file(write(tmp_path / "good.jsonl", [chat(f"q{i}", f"a{i}") for i in range(12)]))
    assert (good.status, good.kind, good.examples, good.details) == ("processed", "conversations", 12, None)
    pair = json.dumps(
        {
            "input": {"messages": [{"role": "user", "content": "hi"}]},
            "preferred_output": [{"role": "assistant", "content": "hello"}],
            "non_preferred_output": [{"role": "assistant", "content": "go away"}],
        }
    )
    pairs = check_file(write(tmp_path / "pairs.jsonl", [pair] * 3))
    assert (pairs.status, pairs.kind, pairs.examples) == ("processed", "pairs", 3)
    lines = [chat("q", "a"), '{"messages": [', json.dumps({"messages": [{"role": "user", "content": "x"}]})]
    bad = check_file(write(tmp_path / "bad.jsonl", lines))
    assert bad.status == "error" and bad.examples == 1
    assert bad.details.startswith("2 bad line(s): line 2: invalid JSON")
    assert "line 3: messages: no assistant message" in bad.details
    assert str(tmp_path) not in bad.details  # the storage layout is not the client's business


def request(**fields):
    return parse_request({"model": "tiny", "training_file": "file-a", **fields})


def test_a_request_maps_onto_a_valid_run_config():
    resolved = build_config(
        request(
            seed=11,
            method={
                "type": "supervised",
                "supervised": {"hyperparameters": {"n_epochs": 2, "learning_rate_multiplier": 0.5}},
            },
        ),
        "/models/tiny",
        "/s/files/file-a.jsonl",
        "/s/files/file-b.jsonl",
        "/s/runs/ftjob-a",
        examples=3,
        defaults={"train": {"lr": 1e-3, "max_steps": 5}},
    )
    cfg = RunConfig.model_validate(resolved.config)
    assert cfg.train.lr == pytest.approx(5e-4)  # the multiplier scales the default lr (here the server's)
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed, cfg.train.max_steps) == (2, 3, 11, 5)
    assert cfg.method == "sft" and cfg.train.resume == "auto" and cfg.output.dir == "/s/runs/ftjob-a"
    assert [s.path for s in cfg.data.train] == ["/s/files/file-a.jsonl"]
    assert [s.path for s in cfg.data.eval] == ["/s/files/file-b.jsonl"]
    assert resolved.hyperparameters == {"n_epochs": 2, "batch_size": 3, "learning_rate_multiplier": 0.5}
    dpo = build_config(
        request(method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.3}}}), "/m", "/t", None, "/r", 20
    )
    cfg = RunConfig.model_validate(dpo.config)
    assert (cfg.method, cfg.dpo.beta, cfg.train.lr, cfg.train.batch_size) == ("dpo", 0.3, 2e-4, 4)
    assert dpo.method["type"] == "dpo" and dpo.hyperparameters["beta"] == 0.3


def test_bad_requests_name_their_field():
    for body, param in [
        ({"suffix": "x:y"}, "suffix"),
        ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters"),
        ({"unknown_field": 1}, "unknown_field"),
        ({"metadata": {str(i): "v" for i in range(17)}}, "metadata"),
    ]:
        with pytest.raises(RequestError) as caught:
            request(**body)
        assert caught.value.param.startswith(param), (body, caught.value.param)
    with pytest.raises(ConfigError, match="seq_len"):
        build_config(request(), "/m", "/t", None, "/r", 20, defaults={"data": {"seq_len": 0}})


def test_model_names_follow_openais_pattern_without_slashes():
    assert model_name("SmolLM2-135M-Instruct", "tunesmith", "quill", "ftjob-abc") == (
        "ft:SmolLM2-135M-Instruct:tunesmith:quill:abc"
    )
    assert model_name("org/odd:name", "tunesmith", None, "ftjob-abc") == "ft:org-odd-name:tunesmith::abc"


def test_metrics_are_tailed_line_by_line_and_checkpoints_recorded_once(tmp_path):
    store = Store(tmp_path)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    job = {
        "id": "ftjob-t",
        "created_at": now(),
        "model": "m",
        "training_file": "f",
        "method": {},
        "hyperparameters": {},
        "seed": 0,
        "status": "running",
        "run_dir": str(run),
        "config_path": "c",
    }
    store.insert("jobs", job)
    lines = [{"step": s, "loss": 2.0 / s, "trained_tokens": 10 * s} for s in (1, 2, 3)]
    text = "".join(json.dumps(line) + "\n" for line in lines)
    cut = text.index("\n", text.index("\n") + 1) + 5  # two lines and the start of the third
    (run / "metrics.jsonl").write_text(text[:cut], encoding="utf-8")
    sync_metrics(store, store.get("jobs", "ftjob-t"))
    (run / "metrics.jsonl").write_text(text, encoding="utf-8")
    sync_metrics(store, store.get("jobs", "ftjob-t"))
    sync_metrics(store, store.get("jobs", "ftjob-t"))  # nothing new: no duplicates
    events = store.select("events", "job_id = ? AND type = 'metrics'", ("ftjob-t",))
    assert [e["data"]["train_loss"] for e in events] == [line["loss"] for line in lines]
    assert store.get("jobs", "ftjob-t")["trained_tokens"] == 30
    for step in (2, 3):
        (run / "checkpoints" / f"step-{step:08d}").mkdir()
        (run / "checkpoints" / f"step-{step:08d}" / "state.json").write_text("{}")
    (run / "checkpoints" / "step-00000004").mkdir()  # half-written: no state.json
    assert sync_checkpoints(store, store.get("jobs", "ftjob-t"), "ft:m") == [2, 3]
    assert sync_checkpoints(store, store.get("jobs", "ftjob-t"), "ft:m") == []
    recorded = store.select("checkpoints", "job_id = ?", ("ftjob-t",))
    assert [(c["step_number"], c["metrics"]["train_loss"]) for c in recorded] == [(2, 1.0), (3, 2.0 / 3)]
