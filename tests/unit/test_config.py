"""Config errors name the key, the bad value and what is allowed, before any model is loaded."""

from __future__ import annotations

import json

import pytest

from tunesmith.config.load import ConfigError, config_schema, dump_config, load_config

BASE = {"data": {"train": [{"path": "x.jsonl"}]}}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=fast", 'train.lr: expected a positive number, got "fast"'),
        ("train.lr=-0.1", "train.lr: expected a positive number, got -0.1"),
        ("train.batch_size=two", 'train.batch_size: expected a positive integer, got "two"'),
        (
            "method=dpoo",
            "method: expected one of 'sft', 'pretrain', 'dpo', 'simpo', 'orpo', 'kto', 'reward' or 'grpo', got \"dpoo\"",
        ),
        (
            "adapter.type=qlor",
            "adapter: expected type one of 'lora', 'qlora', 'full', 'freeze', got \"qlor\"",
        ),
        ("trian.lr=1", "trian: unknown key"),
        ("train.learning_rate=1", "train.learning_rate: unknown key"),
        ("data.train=[]", "data.train: needs at least one entry"),
        ("data.eval_split=1.5", "data.eval_split: expected a number < 1, got 1.5"),
        ("data.train.0.format=xml", "data.train.0.format: expected one of"),
        ("data.on_error=ignore", "data.on_error: expected one of 'raise' or 'skip', got \"ignore\""),
        ("train.resume=yes please", None),  # any string is a checkpoint path: validated when training starts
    ],
)
def test_bad_values_name_key_value_and_allowed(override, message):
    if message is None:
        assert load_config(BASE, [override]).train.resume == "yes please"
        return
    with pytest.raises(ConfigError) as caught:
        load_config(BASE, [override])
    assert message in str(caught.value)


def test_missing_data_section_is_named():
    with pytest.raises(ConfigError, match="data: required key is missing"):
        load_config({"model": "default"})


def test_overrides_reach_lists_and_nested_keys(tmp_path):
    cfg = load_config(
        BASE,
        [
            "data.train=[{path: y.jsonl, format: alpaca}]",
            "output.dir=/tmp/run",
            "adapter.r=8",
            "train.epochs=1.5",
        ],
    )
    assert cfg.data.train[0].path == "y.jsonl" and cfg.data.train[0].format == "alpaca"
    assert cfg.output.dir == "/tmp/run" and cfg.adapter.r == 8 and cfg.train.epochs == 1.5
    cfg = load_config(BASE, ["adapter={type: full}"])
    assert cfg.adapter.type == "full"


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_schema_lists_every_section():
    schema = config_schema()
    json.dumps(schema)
    assert {"model", "method", "adapter", "data", "train", "output"} <= set(schema["properties"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["method=dpo", "kto.beta=0.2"], "a kto: section is set but method is 'dpo'; set method: kto"),
        (["dpo.beta=0.2"], "a dpo: section is set but method is 'sft'"),
        (["method=grpo"], "method grpo needs a grpo: section with its reward functions"),
        (["method=grpo", "grpo.rewards=[]"], "grpo.rewards: grpo needs at least one reward function"),
        (["method=kto", "data.streaming=true", "train.max_steps=5"], "not supported for method 'kto'"),
    ],
)
def test_method_sections_must_match_the_method(overrides, message):
    with pytest.raises(ConfigError) as caught:
        load_config(BASE, overrides)
    assert message in str(caught.value)
    assert "got dict" not in str(caught.value)


def test_grpo_section_with_a_reward_function_loads():
    cfg = load_config(
        BASE, ["method=grpo", 'grpo.rewards=[{"function": "regex", "args": {"pattern": "[0-9]+"}}]']
    )
    assert cfg.grpo is not None and cfg.grpo.rewards[0].args == {"pattern": "[0-9]+"}
    assert cfg.grpo.num_generations == 4


@pytest.mark.parametrize("method", ["sft", "pretrain", "dpo", "simpo", "orpo", "kto", "reward", "grpo"])
def test_the_dumped_config_of_every_method_loads_back(method, tmp_path):
    """A run's config.yaml is what `--resume` reads: it must hold only its own method's section."""
    overrides = [f"method={method}"]
    if method == "grpo":
        overrides.append('grpo.rewards=[{"function": "regex", "args": {"pattern": "yes"}}]')
    cfg = load_config(BASE, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(cfg))
    again = load_config(path)
    assert again == cfg


def test_eval_tasks_take_kind_path_strings_and_sections():
    cfg = load_config(
        BASE,
        ["eval.tasks=[mc:tasks/sci.jsonl, {kind: gen, path: g.jsonl, match: regex, pattern: '\\d+'}]"],
    )
    first, second = cfg.eval.tasks
    assert (first.kind, first.path, first.shots) == ("mc", "tasks/sci.jsonl", 0)
    assert (second.kind, second.match, second.pattern) == ("gen", "regex", "\\d+")
    with pytest.raises(ConfigError, match="KIND:PATH"):
        load_config(BASE, ["eval.tasks=[sci.jsonl]"])
    with pytest.raises(ConfigError, match="eval.tasks.0.kind"):
        load_config(BASE, ["eval.tasks=[bleu:x.jsonl]"])


def test_tracking_names_only_known_backends():
    cfg = load_config(BASE, ["tracking.backends=[tensorboard, mlflow]", "tracking.project=p"])
    assert cfg.tracking.backends == ["tensorboard", "mlflow"] and cfg.tracking.project == "p"
    with pytest.raises(ConfigError, match="tracking.backends.0"):
        load_config(BASE, ["tracking.backends=[comet]"])
