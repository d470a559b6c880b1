"""The web UI in a real headless browser (Debian's chromium, driven by Selenium and chromium-driver).

A `tunesmith ui` process (with an API key, storage in a temporary directory, a tiny random model)
is driven the way a user would: the page asks for the key once; the Train form uploads a file and
starts a tiny run; the Runs page's curve grows as the run streams its metrics; a reload mid-run
shows the same run with nothing lost; the run finishes and the curve holds one point per line of
the run's own metrics.jsonl; the Chat page answers from the fine-tuned model, as the API does for
the same request, beside the base; the Data page shows trained tokens and names the bad rows;
Export merges the run and shows the behaviour check passing. Screenshots of each page are saved
(to $TUNESMITH_UI_SCREENSHOTS, e.g. docs/ui, or the test's temporary directory).

Setup: scripts/setup-browser.sh (apt-get install chromium chromium-driver) and `pip install selenium`.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import IDENTITY_ROWS

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
KEY = "browser-key-3"
STEPS = 300  # long enough to reload mid-run on 2 cores, short enough for a test
TIMEOUT = 240


def _skip_reason() -> str | None:
    if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
        return "chromium and chromium-driver are not installed (run scripts/setup-browser.sh)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


if (_reason := _skip_reason()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, path: str, body: Any = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url + path, data=data, method="POST" if data else "GET")
    request.add_header("Authorization", f"Bearer {KEY}")
    if data:
        request.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("ui-browser")
    defaults = root / "job-defaults.yaml"
    defaults.write_text(yaml.safe_dump({"train": {"precision": "fp32", "warmup_ratio": 0.0}}))
    port = free_port()
    command = [
        sys.executable, "-m", "tunesmith", "ui", str(tiny_model_dirs["llama"]), "--no-browser",
        "--storage", str(root / "storage"), "--port", str(port), "--api-key", KEY,
        "--job-defaults", str(defaults), "--max-tokens", "64", "--max-context", "512",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(root / "server.log", "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_health(url, process)
    except RuntimeError as exc:
        process.kill()
        raise RuntimeError(f"{exc}:\n{(root / 'server.log').read_text()}") from None
    yield {"url": url, "root": root, "storage": root / "storage"}
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def wait_for_health(url: str, process: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).close()
            return
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the server did not start") from None
            time.sleep(0.3)


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("TUNESMITH_UI_SCREENSHOTS") or tmp_path_factory.mktemp("ui-shots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def wait(driver: Any, condition: Any, timeout: float = TIMEOUT, message: str = "") -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.2).until(lambda d: condition(d), message)


def points(driver: Any) -> int:
    return int(driver.find_element(By.ID, "chart").get_attribute("data-points") or 0)


def status(driver: Any) -> str:
    return driver.find_element(By.ID, "run-status").text


def show_run(driver: Any, url: str, job_id: str) -> None:
    driver.get(f"{url}/ui#runs/{job_id}")
    wait(driver, lambda d: d.find_element(By.ID, "run-title").text == job_id, 30, f"{job_id} not shown")


def set_field(driver: Any, element_id: str, value: Any) -> None:
    element = driver.find_element(By.ID, element_id)
    element.clear()
    element.send_keys(str(value))


def test_train_watch_reload_finish_and_chat(server, browser, shots, tmp_path):
    url, driver = server["url"], browser
    driver.get(url + "/ui")
    wait(driver, lambda d: d.find_element(By.ID, "key-dialog").is_displayed(), 30, "no key dialog")
    driver.find_element(By.ID, "key-input").send_keys(KEY)
    driver.find_element(By.ID, "key-submit").click()
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", 30)

    data = tmp_path / "identity.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in IDENTITY_ROWS * 2
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    driver.find_element(By.ID, "train-upload").send_keys(str(data))
    wait(
        driver,
        lambda d: "processed" in d.find_element(By.ID, "upload-status").text,
        30,
        "upload not processed",
    )
    for field, value in (
        ("field-data-seq_len", 64), ("field-data-packing", None), ("field-adapter-r", 4),
        ("field-train-epochs", 50), ("field-train-max_steps", STEPS), ("field-train-batch_size", 2),
        ("field-train-lr", 0.01), ("field-train-log_every", 1),
    ):  # fmt: skip
        if value is None:
            box = driver.find_element(By.ID, field)
            if box.is_selected():
                box.click()
        else:
            set_field(driver, field, value)
    set_field(driver, "field-suffix", "browser")
    config = yaml.safe_load(driver.find_element(By.ID, "yaml").get_attribute("value"))
    assert config["train"]["max_steps"] == STEPS and config["adapter"]["r"] == 4
    assert config["data"]["packing"] is False and config["data"]["train"][0]["path"].startswith("file-")
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(shots / "train.png"))
    driver.find_element(By.ID, "start-button").click()

    wait(driver, lambda d: "#runs/ftjob-" in d.current_url, 30, "Start did not open the run")
    job_id = driver.current_url.split("#runs/")[1]
    wait(driver, lambda d: points(d) > 0, message="no point drawn")
    first = points(driver)
    wait(driver, lambda d: points(d) > first or status(d) != "running", message="the curve did not grow")
    grown = points(driver)
    assert grown > first, f"the run ended before the curve was seen growing ({first} points)"
    assert status(driver) == "running"
    driver.save_screenshot(str(shots / "runs-live.png"))

    events_before = len(driver.find_elements(By.CSS_SELECTOR, "#run-events li"))
    driver.refresh()  # mid-run: the page rebuilds everything from the server
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", 30)
    assert not driver.find_element(By.ID, "key-dialog").is_displayed()  # the key was asked once
    wait(driver, lambda d: d.find_element(By.ID, "run-title").text == job_id, 30, "another run shown")
    wait(driver, lambda d: points(d) >= grown, 30, "points lost on reload")
    wait(driver, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#run-events li")) >= events_before, 30)
    assert driver.find_element(By.ID, "run-config").get_attribute("textContent").count("max_steps") == 1

    wait(driver, lambda d: status(d) == "succeeded", message="the run did not finish")
    wait(driver, lambda d: d.find_element(By.ID, "run-body").get_attribute("data-ended") == "succeeded", 30)
    job = call(url, f"/v1/fine_tuning/jobs/{job_id}")
    run_dir = server["storage"] / "runs" / job_id
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_points = sum(1 for r in logged if "loss" in r) + sum(1 for r in logged if "eval_loss" in r)
    assert points(driver) == train_points and max(r["step"] for r in logged) == STEPS
    losses = [r["loss"] for r in logged if "loss" in r]
    assert sum(losses[-10:]) < sum(losses[:10])  # it trained
    assert driver.find_element(By.ID, "run-model").text == job["fine_tuned_model"]
    assert "done" in driver.find_element(By.ID, "run-log").text
    driver.save_screenshot(str(shots / "runs.png"))

    driver.get(url + "/ui#chat")
    wait(driver, lambda d: job["fine_tuned_model"] in d.find_element(By.ID, "chat-model").text, 30)
    Select(driver.find_element(By.ID, "chat-model")).select_by_visible_text(job["fine_tuned_model"])
    driver.find_element(By.ID, "chat-input").send_keys(IDENTITY_ROWS[0][0])
    driver.find_element(By.ID, "chat-send").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-tuned .msg.assistant"), 120, "no answer")
    wait(
        driver,
        lambda d: d.find_elements(By.CSS_SELECTOR, "#chat-plain .msg.assistant"),
        120,
        "no base answer",
    )
    tuned = driver.find_element(By.CSS_SELECTOR, "#chat-tuned .msg.assistant").text
    plain = driver.find_element(By.CSS_SELECTOR, "#chat-plain .msg.assistant").text
    messages = [{"role": "user", "content": IDENTITY_ROWS[0][0]}]
    for model, shown in ((job["fine_tuned_model"], tuned), (job["model"], plain)):
        reference = call(
            url,
            "/v1/chat/completions",
            {"model": model, "messages": messages, "max_tokens": 48, "temperature": 0},
        )
        assert shown.strip() == reference["choices"][0]["message"]["content"].strip() != ""
    assert tuned != plain  # the fine-tuned model is not the base
    driver.save_screenshot(str(shots / "chat.png"))
    server["job"] = job


def test_data_page_shows_trained_tokens_and_bad_rows(server, browser, shots, tmp_path):
    driver = browser
    driver.get(server["url"] + "/ui#data")
    wait(driver, lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1", 30)
    mixed = tmp_path / "mixed.jsonl"
    good = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in IDENTITY_ROWS[:3]
    ]
    mixed.write_text(
        "".join(json.dumps(r) + "\n" for r in good)
        + '{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n'
    )
    driver.find_element(By.ID, "data-upload").send_keys(str(mixed))
    wait(driver, lambda d: "mixed.jsonl" in d.find_element(By.ID, "data-file-status").text, 30)
    set_field(driver, "data-seq-len", 128)
    driver.find_element(By.ID, "data-preview-button").click()
    wait(driver, lambda d: d.find_elements(By.CSS_SELECTOR, "#data-samples .sample"), 60, "no samples")
    trained = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#data-samples .sample .trained")]
    assert any("My name is Quill." in t for t in trained)
    assert all(IDENTITY_ROWS[0][0] not in t for t in trained)  # the prompt is not trained
    issues = [e.text for e in driver.find_elements(By.CSS_SELECTOR, "#data-issues li")]
    assert [i.split(":")[:2] for i in issues] == [["mixed.jsonl", "4"], ["mixed.jsonl", "5"]]
    driver.save_screenshot(str(shots / "data.png"))


def test_export_merges_the_run_and_shows_the_behaviour_check(server, browser, shots):
    if "job" not in server:
        pytest.skip("needs the finished run of the training test")
    driver = browser
    driver.get(server["url"] + "/ui#export")
    wait(driver, lambda d: server["job"]["fine_tuned_model"] in d.find_element(By.ID, "export-job").text, 30)
    driver.find_element(By.ID, "export-button").click()

    def cell(column: int) -> str | None:  # read in the page: the table is redrawn while it polls
        script = (
            f"return document.querySelector('#export-table tbody tr td:nth-child({column})')?.textContent"
        )
        return driver.execute_script(script)

    wait(driver, lambda d: cell(3) not in (None, "running"), 180, "export hung")
    assert cell(3) == "succeeded", driver.find_element(By.ID, "export-output").text
    assert cell(4) == "passed"
    records = call(server["url"], f"/ui/api/jobs/{server['job']['id']}/exports")["data"]
    assert records[0]["check"] == "passed" and any(Path(records[0]["out"]).glob("*.safetensors"))
    driver.save_screenshot(str(shots / "export.png"))


def test_compare_two_runs_and_cancel_one(server, browser, shots):
    if "job" not in server:
        pytest.skip("needs the finished run of the training test")
    url, driver, first = server["url"], browser, server["job"]
    text = yaml.safe_dump(
        {
            "model": first["model"],
            "data": {"train": [{"path": first["training_file"]}], "seq_len": 64, "packing": False},
            "adapter": {"r": 4},
            "train": {"epochs": 50, "max_steps": 40, "batch_size": 2, "lr": 0.003, "log_every": 1},
        }
    )
    second = call(url, "/ui/api/jobs", {"yaml": text, "suffix": "slow-lr"})
    show_run(driver, url, second["id"])
    wait(driver, lambda d: status(d) == "succeeded", message="the second run did not finish")
    for job_id in (first["id"], second["id"]):  # clicked in the page: the table is redrawn as it polls
        driver.execute_script(f"document.querySelector(\".compare-check[value='{job_id}']\").click()")
    driver.find_element(By.ID, "compare-button").click()
    expected = 0
    for job_id in (first["id"], second["id"]):
        lines = (server["storage"] / "runs" / job_id / "metrics.jsonl").read_text().splitlines()
        expected += sum(1 for line in lines if "loss" in json.loads(line))
    chart = (By.ID, "compare-chart")
    wait(driver, lambda d: int(d.find_element(*chart).get_attribute("data-points") or 0) == expected, 30)
    shown = driver.execute_script(
        "return [...document.querySelectorAll('#compare-table tbody tr td:nth-child(2)')].map(c => c.textContent)"
    )
    assert shown == ["succeeded", "succeeded"]
    driver.save_screenshot(str(shots / "compare.png"))

    long_run = call(url, "/ui/api/jobs", {"yaml": text.replace("max_steps: 40", "max_steps: 5000")})
    show_run(driver, url, long_run["id"])
    wait(driver, lambda d: status(d) == "running" and points(d) > 0, message="the third run did not start")
    driver.find_element(By.ID, "cancel-button").click()
    wait(driver, lambda d: d.find_element(By.ID, "run-body").get_attribute("data-ended") == "cancelled")
    job = call(url, f"/v1/fine_tuning/jobs/{long_run['id']}")
    assert job["status"] == "cancelled" and status(driver) == "cancelled"
    steps = [
        c["step_number"] for c in call(url, f"/v1/fine_tuning/jobs/{long_run['id']}/checkpoints")["data"]
    ]
    assert steps and max(steps) < 5000  # it stopped early, with a checkpoint first
