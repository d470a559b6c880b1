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

import numpy as np
import pytest
import torch
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
    assert [c.name for c in result.check.checks][:5] == [  # then llama.cpp's, where installed
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


def _failed(result: verify.VerifyResult, llama_cpp: bool = False) -> set[str]:
    """The failed checks; without `llama_cpp`, those of transformers' reading only."""
    failed = {check.name for check in result.checks if not check.passed}
    return failed if llama_cpp else {name for name in failed if not name.startswith("llama.cpp")}


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


def test_without_llama_cpp_the_check_says_so_and_still_passes(tiny, tmp_path):
    from tunesmith.export import verify_llama_cpp

    if verify_llama_cpp.available():
        pytest.skip("llama-cpp-python is installed: its reading is tested below")
    result = _check(tiny, tmp_path / "m.gguf", "q8_0")
    assert result.passed, result.summary()
    assert verify_llama_cpp.NOT_INSTALLED in result.notes and "not installed" in result.summary()
    assert not any(check.name.startswith("llama.cpp") for check in result.checks)


@pytest.mark.parametrize("type_name", ["f16", "q8_0", "q4_0"])
def test_llama_cpp_reads_the_file_like_the_trained_model(type_name, tiny, tmp_path):
    """llama.cpp's own tokenizer, end-of-turn id and logits, against the trained tokenizer and model."""
    pytest.importorskip("llama_cpp")
    from tunesmith.export import verify_llama_cpp

    result = _check(tiny, tmp_path / "m.gguf", type_name)
    assert result.passed, result.summary()
    names = {check.name for check in result.checks}
    assert {
        "llama.cpp: file matches its weights",
        "llama.cpp: next-token logits vs the trained model",
        "llama.cpp: chat template",
        "llama.cpp: end-of-turn token",
    } <= names
    assert result.metrics["llama_cpp_file_mean_kl"] <= verify_llama_cpp.LLAMA_CPP_FIDELITY_KL
    criteria = verify.CRITERIA[type_name]
    if criteria.max_kl is not None:
        assert result.metrics["llama_cpp_mean_kl"] <= criteria.max_kl
    assert verify_llama_cpp.NOT_INSTALLED not in result.notes


def test_llama_cpp_sees_a_wrong_end_of_turn_id_too(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    result = _check(tiny, tmp_path / "eot.gguf", eot_id=0)
    assert _failed(result, llama_cpp=True) == {"end-of-turn token", "llama.cpp: end-of-turn token"}


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
    # the run's own tokenizer carries the training template, so only the stop tokens go missing
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
        (["--gguf", "q3_k_m", "--out", "m.gguf"], "llama-quantize"),
        (["--gguf", "q8_0", "--out", "model"], "name it FILE.gguf"),
        (["--adapter-only", "--gguf", "q4_0", "--out", "a.gguf"], "f32, f16, bf16, q8_0"),
        (["--adapter-only", "--out", "adapter"], "name it FILE.gguf"),
    ],
)
def test_cli_refusals_are_one_error_line(args, message, run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert _cli(str(run), *args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("error: ") and message in error[0]


# --- a LoRA adapter on its own ---------------------------------------------------------------------------


def _tensors(path: Path) -> dict[str, Any]:
    from gguf import GGUFReader, dequantize

    reader = GGUFReader(path)
    return {
        t.name: dequantize(t.data, t.tensor_type).reshape(tuple(int(n) for n in reversed(t.shape)))
        for t in reader.tensors
    }


@pytest.fixture(scope="module")
def full_files(run: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """f32 GGUF files of the run's base and of its merged model, written by the full-model path (the one
    transformers' reader checks): what an adapter must turn the one into the other."""
    folder = tmp_path_factory.mktemp("full")
    base_model, tokenizer = load(Path(json.loads((run / "run.json").read_text())["base_model"]))
    files = {"base": folder / "base.gguf", "merged": folder / "merged.gguf"}
    write_gguf(base_model, tokenizer, files["base"], "f32", chat_template=None, eot_id=None)
    merged = load_trained(run)[0].merge_and_unload()
    write_gguf(merged, tokenizer, files["merged"], "f32", chat_template=None, eot_id=None)
    return files


@pytest.mark.parametrize(("type_name", "bound"), [("f32", 1e-5), ("f16", 2e-3), ("q8_0", 2e-2)])
def test_an_adapter_only_export_turns_the_base_file_into_the_merged_one(
    type_name, bound, run, full_files, tmp_path
):
    """Every weight that training changed is in the adapter, and base + (alpha / rank) * lora_b @ lora_a
    rebuilds it (llama/mistral's q/k row permutation included) within what storing A and B costs."""
    from gguf import GGUFReader

    out = tmp_path / "adapter.gguf"
    result = export(run, out, adapter_only=True, gguf_type=type_name)
    assert result.check is not None and result.check.passed, result.check.summary()
    assert json.loads((tmp_path / "adapter.verify.json").read_text())["passed"] is True
    reader = GGUFReader(out)
    assert reader.get_field("general.type").contents() == "adapter"
    assert reader.get_field("adapter.type").contents() == "lora"
    assert reader.get_field("general.architecture").contents() == "llama"
    alpha = reader.get_field("adapter.lora.alpha").contents()
    assert alpha == 16.0  # the adapter config default, at r 8: scale 2
    del reader
    lora, base, merged = _tensors(out), _tensors(full_files["base"]), _tensors(full_files["merged"])
    targets = {name.removesuffix(".lora_a") for name in lora if name.endswith(".lora_a")}
    assert set(lora) == {t + suffix for t in targets for suffix in (".lora_a", ".lora_b")}
    changed = {name for name in merged if not np.array_equal(merged[name], base[name])}
    assert targets == changed and len(targets) == 14  # q, k, v, o, gate, up, down in 2 layers
    for name in sorted(targets):
        a, b = lora[name + ".lora_a"].astype(np.float64), lora[name + ".lora_b"].astype(np.float64)
        assert a.shape == (8, base[name].shape[1]) and b.shape == (base[name].shape[0], 8)
        rebuilt = base[name] + alpha / a.shape[0] * (b @ a)
        change = np.abs(merged[name] - base[name]).max()
        assert np.abs(rebuilt - merged[name]).max() <= bound * change, name


def test_llama_cpp_applies_the_adapter_like_the_merged_model(run, full_files, tmp_path):
    """llama.cpp's own LoRA loading: base file + adapter gives the merged file's next-token logits."""
    llama_cpp = pytest.importorskip("llama_cpp")
    out = tmp_path / "adapter.gguf"
    export(run, out, adapter_only=True, gguf_type="f32", verify=False)
    ids = [1, 5, 40, 77, 120, 2, 9, 33, 64, 200, 150, 7]

    def scores(**kwargs: Any) -> torch.Tensor:
        llm = llama_cpp.Llama(n_ctx=64, logits_all=True, verbose=False, **kwargs)
        try:
            llm.eval(ids)
            return torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
        finally:
            llm.close()

    merged = scores(model_path=str(full_files["merged"]))
    adapted = scores(model_path=str(full_files["base"]), lora_path=str(out))
    base = scores(model_path=str(full_files["base"]))
    assert verify.logit_metrics([merged], [adapted])["max_rel_diff"] <= 1e-4
    assert verify.logit_metrics([merged], [base])["max_rel_diff"] > 1e-2  # the adapter matters


def test_cli_writes_an_adapter_and_checks_it(run, tmp_path, capsys):
    out = tmp_path / "adapter.gguf"
    assert _cli(str(run), "--adapter-only", "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "behaviour check (lora-f32): passed" in printed and "--lora adapter.gguf" in printed


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
