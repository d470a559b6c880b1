"""Preference pairs: the three layouts, their token ids, bad rows, seq_len, and `tunesmith data`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunesmith.cli.main import main
from tunesmith.config.schema import DataConfig
from tunesmith.data.conversation import Conversation, Message, RowRef
from tunesmith.data.errors import DataError, RowIssue
from tunesmith.data.preference import TokenizedPair, build_preference_data
from tunesmith.data.preference_formats import IDENTICAL_NOTE, PreferenceSample
from tunesmith.data.preference_tokenize import tokenize_pairs
from tunesmith.data.tokenize import IGNORE_INDEX, tokenize_conversation
from tunesmith.data.validate import BadRowError, read_samples

SYSTEM = {"role": "system", "content": "Be brief."}


def _write(path: Path, rows: list[Any]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _ids(tokenizer: Any, messages: list[dict[str, Any]], generation_prompt: bool = False) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"] if not isinstance(out, list) else out)


def _expected(tokenizer: Any, prompt: list[dict], chosen: list[dict], rejected: list[dict]) -> tuple:
    """Prompt ids (with the generation prompt) and each answer's tokens up to its <|im_end|>."""
    prompt_ids = _ids(tokenizer, prompt, generation_prompt=True)
    answers = []
    for answer in (chosen, rejected):
        full = _ids(tokenizer, prompt + answer)
        assert full[: len(prompt_ids)] == prompt_ids
        assert full[-2:] == [tokenizer.convert_tokens_to_ids("<|im_end|>"), *tokenizer("\n")["input_ids"]]
        answers.append(full[len(prompt_ids) : -1])  # the newline after <|im_end|> is not the reply's
    return prompt_ids, answers[0], answers[1]


def _build(tokenizer: Any, path: Path, **options: Any) -> Any:
    cfg = DataConfig(train=[{"path": str(path)}], shuffle=False, cache=False, **options)
    return build_preference_data(cfg, tokenizer, "dpo")


def _only_pair(tokenizer: Any, path: Path, **options: Any) -> TokenizedPair:
    built = _build(tokenizer, path, **options)
    assert len(built.train) == 1
    return built.train[0]


# --- the three layouts --------------------------------------------------------------------------


def test_string_prompt_is_one_user_message_rendered_with_the_template(tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}])
    pair = _only_pair(tokenizer, path)
    user = [{"role": "user", "content": "What is 2 + 2?"}]
    expected = _expected(
        tokenizer, user, [{"role": "assistant", "content": "4"}], [{"role": "assistant", "content": "5"}]
    )
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == expected
    assert pair.source == RowRef(str(path), 1) and not pair.truncated
    assert tokenizer.decode(pair.chosen_ids) == "4<|im_end|>"


def test_message_lists_keep_system_and_history(tokenizer, tmp_path):
    prompt = [
        SYSTEM,
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Name a colour."},
    ]
    chosen, rejected = [{"role": "assistant", "content": "Blue."}], [{"role": "assistant", "content": "No."}]
    path = _write(tmp_path / "p.jsonl", [{"prompt": prompt, "chosen": chosen, "rejected": rejected}])
    pair = _only_pair(tokenizer, path)
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == _expected(
        tokenizer, prompt, chosen, rejected
    )


def test_sharegpt_ranking_layout(tokenizer, tmp_path):
    row = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "Capital of France?"}],
        "chosen": {"from": "gpt", "value": "Paris."},
        "rejected": {"from": "gpt", "value": "Lyon."},
    }
    pair = _only_pair(tokenizer, _write(tmp_path / "s.jsonl", [row]))
    prompt = [SYSTEM, {"role": "user", "content": "Capital of France?"}]
    expected = _expected(
        tokenizer,
        prompt,
        [{"role": "assistant", "content": "Paris."}],
        [{"role": "assistant", "content": "Lyon."}],
    )
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == expected


def test_openai_preference_layout(tokenizer, tmp_path):
    prompt = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Say hi."}]
    chosen = [{"role": "assistant", "content": "Hi!"}]
    rejected = [{"role": "assistant", "content": "I will not."}]
    row = {"input": {"messages": prompt}, "preferred_output": chosen, "non_preferred_output": rejected}
    pair = _only_pair(tokenizer, _write(tmp_path / "o.jsonl", [row]))
    assert (pair.prompt_ids, pair.chosen_ids, pair.rejected_ids) == _expected(
        tokenizer, [SYSTEM, prompt[1]], chosen, rejected
    )


def test_completion_is_exactly_what_sft_trains_for_the_reply(tokenizer, tmp_path):
    row = {"prompt": [SYSTEM, {"role": "user", "content": "Q?"}], "chosen": "A long answer.", "rejected": "B"}
    pair = _only_pair(tokenizer, _write(tmp_path / "p.jsonl", [row]))
    conv = Conversation(
        (Message("system", "Be brief."), Message("user", "Q?"), Message("assistant", "A long answer.")),
        RowRef("x", 1),
    )
    sft = tokenize_conversation(tokenizer, tokenizer.chat_template, conv, 1024)
    assert [t for t in sft.labels if t != IGNORE_INDEX] == pair.chosen_ids
    assert sft.input_ids[: len(pair.prompt_ids)] == pair.prompt_ids


# --- detection and the kind of data -------------------------------------------------------------


def test_auto_detects_each_layout_and_refuses_the_wrong_kind(tmp_path):
    files = {
        "p": {"prompt": "q", "chosen": "a", "rejected": "b"},
        "s": {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "a"},
              "rejected": {"from": "gpt", "value": "b"}},
        "o": {"input": {"messages": [{"role": "user", "content": "q"}]},
              "preferred_output": [{"role": "assistant", "content": "a"}],
              "non_preferred_output": [{"role": "assistant", "content": "b"}]},
    }  # fmt: skip
    for name, row in files.items():
        path = _write(tmp_path / f"{name}.jsonl", [row])
        result = read_samples(str(path), pairs=True)
        assert result.formats == {str(path): "preference"}
        sample = result.samples[0]
        assert isinstance(sample, PreferenceSample)
        assert (sample.prompt, sample.chosen, sample.rejected) == (
            (Message("user", "q"),),
            (Message("assistant", "a"),),
            (Message("assistant", "b"),),
        )
        with pytest.raises(
            DataError,
            match=r"holds preference pairs \(chosen/rejected\), which train with a preference method",
        ):
            read_samples(str(path))  # method sft
    chat = _write(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}],
    )
    with pytest.raises(
        DataError,
        match=r"no row of .* is a preference pair .*these look like messages rows, which train with method sft",
    ):
        read_samples(str(chat), pairs=True)
    with pytest.raises(DataError, match=r"^data.train\[0\].format holds messages rows, not preference pairs"):
        read_samples(str(chat), fmt="messages", pairs=True)


# --- bad rows -----------------------------------------------------------------------------------

BAD_ROWS = [
    ({"prompt": "q", "chosen": "a", "rejected": "b"}, None),
    ({"prompt": "q", "chosen": "a"}, 'missing key "rejected"'),
    ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "chosen: empty"),
    ({"prompt": "q", "chosen": "a", "rejected": 3}, "rejected: expected a string or an array of assistant messages, got a number"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "chosen": "a", "rejected": "b"},
     "prompt[1]: the prompt must end with a user or tool message (the answers follow it), got assistant"),
    ({"prompt": "q", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b"}, "chosen[0].content: empty assistant message"),
    ({"prompt": "q", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"},
     "chosen[0]: an answer holds assistant messages (and tool results), got a user message"),
    ({"chosen": "a", "rejected": "b"}, 'missing key "prompt"'),
    ({"conversations": [{"from": "human", "value": "q"}], "chosen": "a", "rejected": {"from": "gpt", "value": "b"}},
     'chosen: expected a message object {"from": "gpt", "value": ...}, got a string'),
    ({"preferred_output": [{"role": "assistant", "content": "a"}], "non_preferred_output": [{"role": "assistant", "content": "b"}]},
     'missing key "input"'),
    ({"input": {"messages": []}, "preferred_output": [{"role": "assistant", "content": "a"}],
      "non_preferred_output": [{"role": "assistant", "content": "b"}]}, "input.messages: empty array"),
]  # fmt: skip


def test_bad_rows_are_skipped_with_their_line_and_key(tokenizer, tmp_path):
    path = _write(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS])
    built = _build(tokenizer, path, on_error="skip", max_dropped_fraction=1.0)
    expected = [RowIssue(RowRef(str(path), i + 1), why) for i, (_, why) in enumerate(BAD_ROWS) if why]
    assert built.report.skipped == expected
    assert [p.source.line for p in built.train] == [1]
    assert built.report.sources[0].skipped == len(expected) and built.report.rows_read == len(BAD_ROWS)


def test_first_bad_row_stops_the_build_under_raise(tokenizer, tmp_path):
    path = _write(tmp_path / "bad.jsonl", [row for row, _ in BAD_ROWS[:3]])
    with pytest.raises(BadRowError) as caught:
        _build(tokenizer, path)
    assert caught.value.issue == RowIssue(RowRef(str(path), 2), 'missing key "rejected"')
    assert str(caught.value).startswith(f'{path}:2: missing key "rejected"\nhint: set data.on_error: skip')


def test_identical_answers_are_kept_and_noted(tokenizer, tmp_path):
    path = _write(
        tmp_path / "p.jsonl",
        [{"prompt": "q", "chosen": "a", "rejected": "b"}, {"prompt": "q", "chosen": "a", "rejected": "a"}],
    )
    built = _build(tokenizer, path)
    assert [p.source.line for p in built.train] == [1, 2]
    assert built.train[1].chosen_ids == built.train[1].rejected_ids
    assert built.report.identical == [RowIssue(RowRef(str(path), 2), IDENTICAL_NOTE)]
    assert "1 with chosen identical to rejected" in built.report.summary()


# --- the shared prompt --------------------------------------------------------------------------

UNSTABLE = (
    "{% for m in messages %}{% if loop.last and m.role == 'assistant' %}A: {{ m.content }}<|im_end|>"
    "{% else %}{{ m.role + ': ' + m.content + '\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
"""The prompt with the generation prompt ("assistant: ") is not how the full conversation begins."""
MERGING = (
    "{% for m in messages %}{{ m.role + ': ' + m.content }}{% if m.role == 'assistant' %}<|im_end|>{% endif %}"
    "{{ '\\n' }}{% endfor %}{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}"
)
"""Text prefix holds, but the trailing space of "assistant: " merges with the answer into one token."""


def _pair(line: int, chosen: str = "Hi", rejected: str = "No") -> PreferenceSample:
    return PreferenceSample(
        (Message("user", "q"),),
        (Message("assistant", chosen),),
        (Message("assistant", rejected),),
        RowRef("f", line),
    )


def test_a_prompt_that_is_not_shared_by_both_answers_is_reported(tokenizer):
    result = tokenize_pairs([_pair(1)], tokenizer, UNSTABLE, 64)
    assert result.pairs == [] and result.dropped == []
    assert result.failed == [
        RowIssue(
            RowRef("f", 1),
            "chat template: chosen: the chat template renders the prompt differently when the chosen answer "
            "follows it (the prompt with the generation prompt is not a prefix of prompt + chosen answer), so "
            "the chosen answer cannot be scored after the prompt the model is given at inference",
        )
    ]
    merged = tokenize_pairs([_pair(2)], tokenizer, MERGING, 64)
    assert [i.ref.line for i in merged.failed] == [2]
    assert "chosen: the prompt's tokens change when the chosen answer follows it" in merged.failed[0].reason
    stable = tokenize_pairs([_pair(3, "\nHi", "\nNo")], tokenizer, MERGING, 64)  # " \n" splits cleanly
    user = [{"role": "user", "content": "q"}]
    prompt = tokenizer.apply_chat_template(
        user, chat_template=MERGING, tokenize=False, add_generation_prompt=True
    )
    assert prompt == "user: q\nassistant: "
    prompt_ids = tokenizer(prompt)["input_ids"]
    assert stable.failed == [] and stable.pairs[0].prompt_ids == prompt_ids
    assert stable.pairs[0].chosen_ids == tokenizer(prompt + "\nHi<|im_end|>")["input_ids"][len(prompt_ids) :]


# --- seq_len ------------------------------------------------------------------------------------


def test_seq_len_cuts_the_prompt_from_the_left_and_keeps_the_answers(tokenizer, tmp_path):
    path = _write(
        tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2?", "chosen": "It is four.", "rejected": "5"}]
    )
    whole = _only_pair(tokenizer, path)
    seq_len = len(whole.prompt_ids) + len(whole.chosen_ids) - 10
    built = _build(tokenizer, path, seq_len=seq_len)
    cut = built.train[0]
    assert cut.truncated and built.report.truncated == 1
    assert cut.prompt_ids == whole.prompt_ids[10:]
    assert (cut.chosen_ids, cut.rejected_ids) == (whole.chosen_ids, whole.rejected_ids)
    assert len(cut.prompt_ids) + len(cut.chosen_ids) == seq_len


def test_a_pair_whose_answer_does_not_fit_is_dropped_not_cut(tokenizer, tmp_path):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "word " * 20, "rejected": "b"},
    ]
    path = _write(tmp_path / "p.jsonl", rows)
    longest = len(_only_pair(tokenizer, _write(tmp_path / "one.jsonl", rows[1:])).chosen_ids)
    built = _build(tokenizer, path, seq_len=longest)  # no room left for a single prompt token
    assert [p.source.line for p in built.train] == [1]
    assert [(i.ref.line, i.reason.split(" (")[0]) for i in built.report.dropped] == [
        (2, f"answer truncated away by seq_len {longest}")
    ]
    with pytest.raises(
        DataError, match=r"1 of 2 rows were skipped or dropped, more than data.max_dropped_fraction \(10%\)"
    ):
        _build(tokenizer, path, seq_len=longest, max_dropped_fraction=0.1)


# --- splits and what is refused -----------------------------------------------------------------


def test_eval_split_dedup_and_refused_options(tokenizer, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": "a", "rejected": "b"} for i in range(4)] + [
        {"prompt": "q0", "chosen": "a", "rejected": "b"}
    ]
    path = _write(tmp_path / "p.jsonl", rows)
    built = _build(tokenizer, path, eval_split=0.25, dedup=True)
    assert built.report.duplicates == 1
    assert len(built.train) == 3 and len(built.eval) == 1
    assert sorted(p.source.line for p in built.train + built.eval) == [1, 2, 3, 4]
    assert built.report.sources[0].held_out == 1
    with pytest.raises(
        DataError, match=r"data.train\[0\].weight: mixtures are not supported for preference pairs"
    ):
        build_preference_data(DataConfig(train=[{"path": str(path), "weight": 2}]), tokenizer, "dpo")
    with pytest.raises(DataError, match="data.streaming is not supported for preference pairs"):
        build_preference_data(DataConfig(train=[{"path": str(path)}], streaming=True), tokenizer, "dpo")


# --- tunesmith data check / preview -------------------------------------------------------------


def _config(tmp_path: Path, data: Path) -> Path:
    cfg = {
        "model": "default",
        "method": "dpo",
        "data": {"train": [{"path": str(data)}], "seq_len": 256, "shuffle": False, "cache": False},
        "output": {"dir": str(tmp_path / "run")},
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return path


def test_data_check_lists_bad_rows_and_notes(tmp_path, capsys):
    rows = [
        {"prompt": "q", "chosen": "a", "rejected": "b"},
        {"prompt": "q", "chosen": "a", "rejected": "a"},
        {"prompt": "q", "chosen": "", "rejected": "b"},
    ]
    data = _write(tmp_path / "pairs.jsonl", rows)
    assert main(["data", "check", str(_config(tmp_path, data))]) == 1
    assert capsys.readouterr().out.splitlines() == [
        f"{data}:2: note: {IDENTICAL_NOTE}",
        f"{data}:3: chosen: empty",
        "checked 3 rows in 1 file of 1 sources: 1 problem, 1 note",
    ]


def test_data_preview_shows_the_three_spans(tokenizer, tmp_path, capsys):
    data = _write(tmp_path / "pairs.jsonl", [{"prompt": "Say hi.", "chosen": "Hi!", "rejected": "No."}])
    config = str(_config(tmp_path, data))
    assert main(["data", "preview", config, "--json"]) == 0
    out = capsys.readouterr()
    record = json.loads(out.out)
    expected = _expected(
        tokenizer,
        [{"role": "user", "content": "Say hi."}],
        [{"role": "assistant", "content": "Hi!"}],
        [{"role": "assistant", "content": "No."}],
    )
    assert (record["prompt_ids"], record["chosen_ids"], record["rejected_ids"]) == expected
    assert (record["chosen"], record["rejected"], record["source"]) == (
        "Hi!<|im_end|>",
        "No.<|im_end|>",
        f"{data}:1",
    )
    assert "pairs: 1 train, 0 eval" in out.err
    assert main(["data", "preview", config]) == 0
    text = capsys.readouterr().out
    shown = "user\nSay hi.<|im_end|>\n<|im_start|>assistant\n\nchosen:\n[[Hi!<|im_end|>]]\n\nrejected:\n[[No.<|im_end|>]]\n"
    assert shown in text
    header = (
        f"--- pair 1 of 1 ({data}:1, prompt {len(expected[0])} tokens, chosen 3, rejected 3) ---\nprompt:\n"
    )
    assert header in text and [len(expected[1]), len(expected[2])] == [3, 3]
    assert "(scored tokens in [[...]])" in text
