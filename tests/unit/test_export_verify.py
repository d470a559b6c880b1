"""The behaviour check of `tunesmith export`: a correct export passes and says so in verify.json; a
broken one (a corrupted tensor, a wrong end-of-turn id, another chat template, a generation config
that would not stop at the end of a turn) fails with a message that names what differed.

The run is a tiny llama with a LoRA trained on the identity rows, rendered with the built-in ChatML
template while the tokenizer's own template is another one: the export must carry the template the
model was trained with, not the tokenizer's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import pytest
from test_gguf_export import load, sentencepiece_style_tokenizer, tiny_model_dir, tiny_tokenizer

from conftest import base_config, write_chat_jsonl
from tunesmith.export import verify
from tunesmith.export.gguf_writer import round_like_export, write_gguf
from tunesmith.export.merge import ExportMismatch, export, export_run

PLAIN = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"


def _plain_tokenizer(folder: Path) -> Any:
    """EOS is <|endoftext|> (0) while ChatML ends a turn with <|im_end|> (2), as in Qwen2 base models."""
    return tiny_tokenizer(folder, template=PLAIN, eos="<|endoftext|>")


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tunesmith.config.load import load_config
    from tunesmith.training.loop import train

    root = tmp_path_factory.mktemp("verify-run")
    model_dir = tiny_model_dir("llama", root / "base", _plain_tokenizer, eos_token_id=0, pad_token_id=0)
    cfg = base_config(
        model_dir,
        write_chat_jsonl(root / "chat.jsonl"),
        root / "run",
        adapter={"type": "lora", "r": 8},
        data={"template": "chatml"},
        train={"epochs": 3, "lr": 2e-2},
    )
    train(load_config(cfg), show_progress=False)
    return root / "run"


def load_trained(run: Path) -> tuple[Any, Any]:
    from tunesmith.infer.loading import load_for_inference

    return load_for_inference(str(run))


@pytest.fixture(scope="module")
def chatml() -> str:
    from tunesmith.data.templates import BUILTIN_TEMPLATES

    return BUILTIN_TEMPLATES["chatml"]


# --- a correct export passes ------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["f16", "q8_0", "q4_0"])
def test_a_gguf_export_of_a_trained_run_passes_and_writes_its_report(type_name, run, chatml, tmp_path):
    out = tmp_path / f"model-{type_name}.gguf"
    result = export(run, out, gguf_type=type_name)
    assert result.check is not None and result.check.passed, result.check.summary()
    assert [c.name for c in result.check.checks] == [
        "file matches its weights",
        "next-token logits vs the trained model",
        "chat template",
        "end-of-turn token",
        "eos token",
    ]
    report = json.loads((tmp_path / f"model-{type_name}.verify.json").read_text())
    assert report["passed"] and report["type"] == type_name
    assert report["metrics"]["file_max_rel_diff"] <= verify.FIDELITY
    from gguf import GGUFReader

    reader = GGUFReader(out)
    assert reader.get_field("tokenizer.chat_template").contents() == chatml  # the training template
    assert reader.get_field("tokenizer.ggml.eot_token_id").contents() == 2  # <|im_end|>


def test_the_check_compares_with_the_trained_model_not_the_base(run, tmp_path):
    """The trained adapter moved the logits far beyond every tolerance: exporting the base would fail."""
    trained = export(run, tmp_path / "t.gguf", gguf_type="f32").check
    base_model_dir = Path(json.loads((run / "run.json").read_text())["base_model"])
    model, tokenizer = load(base_model_dir)
    from tunesmith.export.merge import training_template

    ref = verify.reference(load_trained(run)[0], tokenizer, training_template(run, tokenizer)[0])
    base = verify.logits_for(model, ref.renders)
    assert verify.logit_metrics(ref.logits, base)["max_rel_diff"] > 100 * verify.CRITERIA["f32"].max_rel_diff
    assert trained.metrics["max_rel_diff"] <= verify.CRITERIA["f32"].max_rel_diff


def test_a_merged_export_carries_template_stop_tokens_and_passes(run, chatml, tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    out = export_run(run, tmp_path / "merged", merge=True)
    assert AutoTokenizer.from_pretrained(out).chat_template == chatml
    assert GenerationConfig.from_pretrained(out).eos_token_id == [0, 2]  # EOS and the end of turn
    report = json.loads((out / "verify.json").read_text())
    assert report["passed"] and report["type"] == "merged"


def test_end_of_turn_comes_from_the_template(tmp_path, chatml):
    tokenizer = tiny_tokenizer(tmp_path / "tok", template=PLAIN)
    assert verify.end_of_turn_id(tokenizer, chatml) == tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert verify.end_of_turn_id(tokenizer, PLAIN) == tokenizer.eos_token_id  # plain text ends the turn


# --- a broken export fails, saying what differed -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory, chatml: str) -> tuple[Any, Any, verify.Reference]:
    model, tokenizer = load(
        tiny_model_dir(
            "llama", tmp_path_factory.mktemp("tiny") / "m", _plain_tokenizer, eos_token_id=0, pad_token_id=0
        )
    )
    return model, tokenizer, verify.reference(model, tokenizer, chatml)


def _check(tiny: Any, out: Path, type_name: str = "f16", **overrides: Any) -> verify.VerifyResult:
    import copy

    model, tokenizer, ref = tiny
    kwargs = {"chat_template": ref.template, "eot_id": ref.eot_id, **overrides}
    written = write_gguf(model, tokenizer, out, type_name, **kwargs)
    rounded = copy.deepcopy(model)
    round_like_export(rounded, written.plan)
    return verify.verify_gguf(ref, out, type_name, tokenizer, verify.logits_for(rounded, ref.renders))


def _failed(result: verify.VerifyResult) -> set[str]:
    return {check.name for check in result.checks if not check.passed}


def test_a_correct_file_passes(tiny, tmp_path):
    result = _check(tiny, tmp_path / "ok.gguf")
    assert result.passed, result.summary()
    assert result.metrics["file_max_rel_diff"] <= verify.FIDELITY


def test_a_sentencepiece_vocabulary_passes_despite_the_readers_missing_spaces(tmp_path, chatml):
    """transformers' GGUF tokenizer drops the '▁' a SentencePiece vocabulary puts after special tokens
    (llama.cpp 0.3.36 keeps it, giving the original's ids): the check allows exactly that difference."""
    model, tokenizer = load(tiny_model_dir("llama", tmp_path / "m", sentencepiece_style_tokenizer))
    result = _check((model, tokenizer, verify.reference(model, tokenizer, chatml)), tmp_path / "g" / "m.gguf")
    assert result.passed, result.summary()
    template = next(c for c in result.checks if c.name == "chat template")
    assert "apart from the standalone" in template.detail


def test_a_corrupted_tensor_fails_the_logit_checks(tiny, tmp_path):
    from gguf import GGUFReader

    out = tmp_path / "broken.gguf"
    assert _check(tiny, out).passed
    tensor = next(t for t in GGUFReader(out, "r+").tensors if t.name == "blk.1.attn_v.weight")
    tensor.data[...] = tensor.data[::-1].copy()  # rows reversed on disk: same values, wrong places
    del tensor
    result = verify.verify_gguf(tiny[2], out, "f16", tiny[1], None)
    assert "next-token logits vs the trained model" in _failed(result), result.summary()
    assert "logits differ beyond the tolerance" in result.failures()


def test_a_wrong_end_of_turn_id_fails_naming_both_tokens(tiny, tmp_path):
    result = _check(tiny, tmp_path / "eot.gguf", eot_id=0)
    assert _failed(result) == {"end-of-turn token"}
    assert "export 0 (<|endoftext|>); trained model 2 (<|im_end|>)" in result.failures()


def test_another_chat_template_fails(tiny, tmp_path):
    result = _check(tiny, tmp_path / "template.gguf", chat_template=PLAIN)
    assert _failed(result) == {"chat template"}
    assert "not the one training used" in result.failures()


def test_a_file_that_computes_something_else_fails_the_fidelity_check(tiny, tmp_path, monkeypatch):
    """A layout bug (here: llama's q/k permutation skipped) is caught against the rounded weights."""
    from tunesmith.export import gguf_arch

    monkeypatch.setitem(gguf_arch.ARCHS, "llama", gguf_arch.ArchSpec("llama", "LLAMA"))
    result = _check(tiny, tmp_path / "layout.gguf", type_name="q8_0")
    assert "file matches its weights" in _failed(result), result.summary()


def test_a_merged_directory_without_the_end_of_turn_stop_fails(run, tmp_path, monkeypatch):
    from tunesmith.export import merge

    monkeypatch.setattr(merge, "prepare_model_dir", lambda model, tokenizer, template, eot: None)
    result = export(run, tmp_path / "merged", merge=True)
    assert "chat template" in _failed(result.check)  # the tokenizer's own template, not the trained one
    assert "end-of-turn token (generation_config eos_token_id)" in _failed(result.check)
    with pytest.raises(ExportMismatch, match="failed the behaviour check: .*end-of-turn"):
        export_run(run, tmp_path / "merged2", merge=True)


# --- the command ---------------------------------------------------------------------------------------


def _cli(*argv: str) -> int:
    from tunesmith.cli.export_cmd import add_export_parser, run_export

    parser = argparse.ArgumentParser(prog="tunesmith")
    add_export_parser(parser.add_subparsers(dest="command", required=True))
    return run_export(parser.parse_args(["export", *argv]))


def test_cli_exports_checks_and_reports(run, tmp_path, capsys):
    out = tmp_path / "model-q8_0.gguf"
    assert _cli(str(run), "--gguf", "q8_0", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert f"exported to {out}" in printed and "behaviour check (q8_0): passed" in printed
    assert "model-q8_0.verify.json" in printed


def test_cli_exits_non_zero_naming_what_differed(run, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(verify.CRITERIA, "q8_0", verify.Criteria(max_kl=0.0))
    assert _cli(str(run), "--gguf", "q8_0", "--out", str(tmp_path / "m.gguf")) == 1
    error = capsys.readouterr().err
    assert "does not behave like the trained model" in error and "mean KL" in error
    assert json.loads((tmp_path / "m.verify.json").read_text())["passed"] is False


def test_cli_no_verify_skips_the_check(run, tmp_path, capsys):
    assert _cli(str(run), "--gguf", "f16", "--out", str(tmp_path / "m.gguf"), "--no-verify") == 0
    assert "skipped" in capsys.readouterr().out and not (tmp_path / "m.verify.json").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gguf", "q5_k_m", "--out", "m.gguf"], "llama-quantize"),
        (["--gguf", "q8_0", "--out", "model"], "name it FILE.gguf"),
    ],
)
def test_cli_refusals_are_one_error_line(args, message, run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(str(run), *args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]


# --- the default model ---------------------------------------------------------------------------------


@pytest.mark.slow  # trains a LoRA on SmolLM2-135M, then writes and reads back two GGUF files (~5 min)
def test_default_model_exports_pass_for_f16_and_q8_0(tmp_path):
    from tunesmith.config.load import load_config
    from tunesmith.training.loop import train

    cfg = base_config(
        "default",
        write_chat_jsonl(tmp_path / "chat.jsonl"),
        tmp_path / "run",
        adapter={"type": "lora", "r": 8},
        train={"epochs": 2, "lr": 2e-3, "batch_size": 4},
    )
    train(load_config(cfg), show_progress=False)
    for type_name in ("f16", "q8_0"):
        result = export(tmp_path / "run", tmp_path / f"smollm2-{type_name}.gguf", gguf_type=type_name)
        assert result.check.passed, result.check.summary()
        assert result.check.metrics["top1_agreement_confident"] >= 0.95
