"""The chat template a run trained with travels with it: run directory, chat, merged export, serve.

The base here is what a new user meets with a base model: a tokenizer with no chat template and an
eos (`<|endoftext|>`) that is not the template's end-of-turn token (`<|im_end|>`). It is trained with
the built-in `chatml` template; every reader of the run must then render prompts exactly as
training did, and stop on `<|im_end|>` as well as on eos.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import base_config, tiny_config, write_chat_jsonl
from tunesmith.data.templates import BUILTIN_TEMPLATES

TEMPLATE = "chatml"
EOS, EOT = "<|endoftext|>", "<|im_end|>"
QUESTION = [{"role": "user", "content": "What is your name?"}]


def _bare_model_dir(folder: Path, tokenizer_dir: Path) -> Path:
    """A tiny random llama whose tokenizer has no chat template and whose eos is `<|endoftext|>`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.chat_template = None
    tokenizer.eos_token = EOS
    tokenizer.pad_token = EOS
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = tiny_config("llama", len(tokenizer))
    config.eos_token_id = config.pad_token_id = eos_id
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.eos_token_id = eos_id
    model.generation_config.pad_token_id = eos_id
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def _ids_of(tokenizer: Any) -> tuple[int, int]:
    eos, eot = tokenizer.convert_tokens_to_ids([EOS, EOT])
    assert eos != eot
    return eos, eot


def _reference_prompt(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The prompt as training rendered it: the built-in template applied to the bare tokenizer."""
    encoded = tokenizer.apply_chat_template(
        messages, chat_template=BUILTIN_TEMPLATES[TEMPLATE], add_generation_prompt=True, return_dict=True
    )
    return list(encoded["input_ids"])


@pytest.fixture(scope="module")
def bare_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    return _bare_model_dir(tmp_path_factory.mktemp("bare") / "model", tokenizer_dir)


@pytest.fixture(scope="module")
def bare_tokenizer(bare_dir: Path) -> Any:
    from tunesmith.models.load import load_tokenizer

    tokenizer = load_tokenizer(bare_dir)
    assert not tokenizer.chat_template  # the premise: a base without a template
    return tokenizer


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, bare_dir: Path) -> Path:
    from tunesmith.config.load import load_config
    from tunesmith.training.loop import train

    root = tmp_path_factory.mktemp("travels")
    cfg = base_config(
        bare_dir,
        write_chat_jsonl(root / "chat.jsonl"),
        root / "run",
        data={"template": TEMPLATE},
        adapter={"type": "lora", "r": 8},
        train={"epochs": 2, "lr": 2e-2},
    )
    train(load_config(cfg), show_progress=False)
    return root / "run"


def test_run_directory_saves_the_training_template_and_trust_remote_code(run):
    from transformers import AutoTokenizer

    from tunesmith.training.run_dir import TEMPLATE_SAVED, read_run_info

    assert AutoTokenizer.from_pretrained(run / "adapter").chat_template == BUILTIN_TEMPLATES[TEMPLATE]
    info = read_run_info(run)
    assert info["trust_remote_code"] is False
    assert info[TEMPLATE_SAVED] is True


def _greedy_reference(model: Any, prompt: list[int], stop_ids: list[int], max_new_tokens: int) -> list[int]:
    """transformers' own greedy decoding, cut after the first stop id (which is not part of the reply)."""
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=stop_ids,
        pad_token_id=stop_ids[0],
    )[0, len(prompt) :].tolist()
    for i, token in enumerate(out):
        if token in stop_ids:
            return out[:i]
    return out


def test_chat_with_a_run_of_a_template_less_base(run, bare_tokenizer, capsys):
    from tunesmith.infer.chat import ChatSession, run_chat
    from tunesmith.infer.loading import load_for_inference

    model, tokenizer = load_for_inference(str(run))
    session = ChatSession(model, tokenizer)
    try:
        prompt = session.prompt(QUESTION)
        assert prompt == _reference_prompt(bare_tokenizer, QUESTION)
        eos, eot = _ids_of(tokenizer)
        assert {eos, eot} <= session.stop_ids
    finally:
        session.close()
    with torch.no_grad():
        expected = _greedy_reference(model, prompt, [eos, eot], 12)
    assert run_chat(str(run), prompt=QUESTION[0]["content"], max_new_tokens=12) == 0
    printed = capsys.readouterr().out
    assert printed == tokenizer.decode(expected, skip_special_tokens=True).strip() + "\n"


def _as_an_older_run(run: Path, old: Path) -> Path:
    """A copy of `run` as runs were saved before the tokenizer carried the training template."""
    from tunesmith.training.run_dir import TEMPLATE_SAVED

    shutil.copytree(run, old)
    (old / "adapter" / "chat_template.jinja").unlink(missing_ok=True)
    config_path = old / "adapter" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    info = json.loads((old / "run.json").read_text())
    del info[TEMPLATE_SAVED], info["trust_remote_code"]
    (old / "run.json").write_text(json.dumps(info))
    return old


def test_run_saved_before_the_template_travelled_gets_it_from_config_yaml(run, tmp_path):
    from tunesmith.infer.loading import load_for_inference

    old = _as_an_older_run(run, tmp_path / "old-run")

    from transformers import AutoTokenizer

    assert not AutoTokenizer.from_pretrained(old / "adapter").chat_template  # as older runs saved it
    _, tokenizer = load_for_inference(str(old))
    assert tokenizer.chat_template == BUILTIN_TEMPLATES[TEMPLATE]


def test_merged_export_carries_the_training_template(run, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from tunesmith.export.merge import export_run

    out = export_run(run, tmp_path / "merged", merge=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == BUILTIN_TEMPLATES[TEMPLATE]
    eos, eot = _ids_of(tokenizer)
    stops = GenerationConfig.from_pretrained(out).eos_token_id
    assert {eos, eot} <= set([stops] if isinstance(stops, int) else stops)


def test_serve_renders_with_the_training_template(run, bare_tokenizer):
    from tunesmith.serve.adapters import load_model_set
    from tunesmith.serve.engine import Engine
    from tunesmith.serve.prepare import prepare_chat
    from tunesmith.serve.schemas import ChatRequest
    from tunesmith.serve.settings import ServeSettings

    models = load_model_set(str(run))
    body = ChatRequest(model=run.name, messages=QUESTION, max_tokens=12, temperature=0)
    prepared = prepare_chat(body, models, ServeSettings())
    assert prepared.prompts == [_reference_prompt(bare_tokenizer, QUESTION)]
    eos, eot = _ids_of(bare_tokenizer)
    params = prepared.jobs[0][1]
    assert {eos, eot} <= params.stop_token_ids

    engine = Engine(models.model, max_context=models.context_length)
    try:
        tokens = engine.generate(prepared.prompts[0], params, prepared.served.adapter).tokens
    finally:
        engine.close()
    models.model.set_adapter(prepared.served.adapter)
    with torch.no_grad():
        assert tokens == _greedy_reference(models.model, prepared.prompts[0], [eos, eot], 12)


def _eot_after_a_few_tokens(
    model: Any, prompt: list[int], eot: int, steps: int = 16
) -> tuple[list[int], int]:
    """Bias the head towards `eot` just enough that greedy decoding emits it first at a later step.

    Greedy tokens of the unbiased model and, per step, how far `eot`'s logit is below the best:
    a bias between the gap at step j and the smallest gap before it leaves steps < j unchanged and
    makes step j pick `eot`. Returns the tokens before it and j.
    """
    tokens, rows = list(prompt), []
    with torch.no_grad():
        for _ in range(steps):  # plain greedy decoding, one full forward per step
            row = model(input_ids=torch.tensor([tokens])).logits[0, -1]
            rows.append(row)
            tokens.append(int(row.argmax()))
    logits = torch.stack(rows)
    gaps = (logits.max(dim=-1).values - logits[:, eot]).tolist()
    step = next(j for j in range(2, steps) if gaps[j] < min(gaps[:j]))
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(model.lm_head.weight)
        head.bias.zero_()
        head.bias[eot] = (gaps[step] + min(gaps[:step])) / 2
    model.lm_head = head
    return tokens[len(prompt) : len(prompt) + step], step


def test_generation_stops_on_end_of_turn_that_is_not_eos(bare_dir):
    from tunesmith.infer.chat import ChatSession
    from tunesmith.infer.generate import generate_reply, reply_stop_ids
    from tunesmith.models.load import load_model, load_tokenizer

    model = load_model(bare_dir).eval()
    tokenizer = load_tokenizer(bare_dir)
    tokenizer.chat_template = BUILTIN_TEMPLATES[TEMPLATE]
    eos, eot = _ids_of(tokenizer)
    assert reply_stop_ids(model, tokenizer) == sorted({eos, eot})

    prompt = _reference_prompt(tokenizer, QUESTION)
    before, step = _eot_after_a_few_tokens(model, prompt, eot)
    with torch.no_grad():
        eos_only = _greedy_reference(model, prompt, [eos], 24)
    assert eos_only[: step + 1] == before + [eot] and len(eos_only) > step + 1  # eos alone runs on

    expected = tokenizer.decode(before, skip_special_tokens=True).strip()
    assert generate_reply(model, tokenizer, QUESTION, max_new_tokens=24) == expected
    session = ChatSession(model, tokenizer)
    try:
        assert session.reply(QUESTION, 24, 0.0) == expected
        from tunesmith.serve.sampling import SamplingParams

        result = session.engine.generate(prompt, SamplingParams(24, 0.0, stop_token_ids=session.stop_ids))
        assert (result.tokens, result.finish) == (before, "stop")
    finally:
        session.close()


def _trusting_copy(run: Path, copy: Path) -> Path:
    """A copy of `run` whose run.json records trust_remote_code: true."""
    shutil.copytree(run, copy)
    info = json.loads((copy / "run.json").read_text())
    info["trust_remote_code"] = True
    (copy / "run.json").write_text(json.dumps(info))
    return copy


def _spy_on_loads(module: Any, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, bool]]:
    """Record the trust_remote_code of every model and tokenizer load `module` makes."""
    seen: list[tuple[str, bool]] = []
    real_model, real_tokenizer = module.load_model, module.load_tokenizer

    def load_model(model_dir: Path, dtype: Any = torch.float32, trust_remote_code: bool = False) -> Any:
        seen.append(("model", trust_remote_code))
        return real_model(model_dir, dtype, trust_remote_code)

    def load_tokenizer(model_dir: Path, trust_remote_code: bool = False) -> Any:
        seen.append(("tokenizer", trust_remote_code))
        return real_tokenizer(model_dir, trust_remote_code)

    monkeypatch.setattr(module, "load_model", load_model)
    monkeypatch.setattr(module, "load_tokenizer", load_tokenizer)
    return seen


def test_inference_loads_with_the_trust_remote_code_the_run_recorded(run, tmp_path, monkeypatch):
    from tunesmith.infer import loading

    copy = _trusting_copy(run, tmp_path / "trusting-run")
    seen = _spy_on_loads(loading, monkeypatch)
    for spec in (copy, copy / "adapter", run):
        loading.load_for_inference(str(spec))
    assert seen == [("model", True), ("tokenizer", True)] * 2 + [("model", False), ("tokenizer", False)]


def test_serve_gives_older_runs_their_template_and_passes_trust_remote_code(run, tmp_path, monkeypatch):
    from tunesmith.serve import adapters

    old = _as_an_older_run(run, tmp_path / "old-run")
    trusting = _trusting_copy(run, tmp_path / "trusting-run")
    seen = _spy_on_loads(adapters, monkeypatch)
    models = adapters.load_model_set(str(old), [("trusting", str(trusting))])
    assert models.served["old-run"].tokenizer.chat_template == BUILTIN_TEMPLATES[TEMPLATE]
    assert models.served["trusting"].tokenizer.chat_template == BUILTIN_TEMPLATES[TEMPLATE]
    assert not models.served[models.base_name].tokenizer.chat_template  # the bare base keeps its own
    assert seen == [("model", True), ("tokenizer", True), ("tokenizer", True), ("tokenizer", True)]
