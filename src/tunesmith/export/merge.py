"""`tunesmith export`: a merged model directory or a GGUF file, checked against the trained model.

The flow: load the trained model (base + adapter, unmerged) -> record what it does on a few
conversations (`verify.reference`) -> merge the adapter and check the merge in memory -> write the
export -> free the model -> read the export back with an independent reader and compare
(`verify.verify_gguf` / `verify.verify_model_dir`), writing the result beside the export.

A merged directory carries what serving stacks read besides the weights: the chat template training
used, the special tokens, and a generation_config whose `eos_token_id` includes the template's
end-of-turn token (so generation stops at `<|im_end|>` even where EOS is another token).
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.data.templates import training_template
from tunesmith.export.verify import Reference, VerifyResult, reference, report_path
from tunesmith.infer.loading import load_for_inference
from tunesmith.models.quantization import is_quantized
from tunesmith.models.save import save_model_dir

log = logging.getLogger(__name__)


class ExportMismatch(RuntimeError):
    pass


class NeedsMerge(ValueError):
    """A LoRA run exported without --merge (or --gguf)."""


@dataclass
class ExportResult:
    path: Path
    kind: str  # "merged" or the GGUF type
    check: VerifyResult | None = None
    report: Path | None = None
    notes: list[str] = field(default_factory=list)


def prepare_model_dir(model: Any, tokenizer: Any, template: str | None, eot_id: int | None) -> None:
    """Put the training template on the tokenizer and the stop tokens in the generation config."""
    from transformers import GenerationConfig

    if template is not None:
        tokenizer.chat_template = template
    generation = getattr(model, "generation_config", None) or GenerationConfig()
    eos = generation.eos_token_id
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    for token_id in (tokenizer.eos_token_id, eot_id):
        if token_id is not None and token_id not in ids:
            ids.append(int(token_id))
    generation.eos_token_id = ids[0] if len(ids) == 1 else ids or None
    if tokenizer.bos_token_id is not None:
        generation.bos_token_id = tokenizer.bos_token_id
    if tokenizer.pad_token_id is not None:
        generation.pad_token_id = tokenizer.pad_token_id
    model.generation_config = generation


def export(
    run_dir: Path,
    out: Path,
    *,
    merge: bool = False,
    gguf_type: str | None = None,
    verify: bool = True,
    tolerance: float = 1e-3,
    adapter_only: bool = False,
    say: Callable[[str], None] = log.info,
) -> ExportResult:
    """Export a finished run (or a model directory) as a merged directory or, with `gguf_type`, a GGUF file;
    with `adapter_only`, the run's LoRA alone as a GGUF LoRA adapter (`gguf_type` f32 by default).

    `say` receives one line per step (the CLI prints them)."""
    from tunesmith.export.gguf_writer import check_type, round_like_export, write_gguf
    from tunesmith.export.verify import logits_for

    run_dir, out = Path(run_dir), Path(out)
    if adapter_only:
        return export_adapter(run_dir, out, gguf_type or "f32", verify=verify, say=say)
    if gguf_type is not None:
        gguf_type = check_type(gguf_type)
    say(f"loading {run_dir}")
    model, tokenizer = load_for_inference(str(run_dir))
    is_adapter = hasattr(model, "merge_and_unload")
    if is_adapter and not merge and gguf_type is None:
        raise NeedsMerge("this run holds a LoRA adapter: pass --merge to fold it into the base weights")
    if is_adapter and is_quantized(model):
        say(
            "de-quantizing the base (a pre-quantized checkpoint) to merge the adapter into full-precision weights"
        )
        model = dequantized_adapter_model(model)
    template, notes = training_template(run_dir, tokenizer)
    ref = reference(model, tokenizer, template)
    rounded = ref.logits
    if is_adapter:
        model = model.merge_and_unload()
        rounded = logits_for(model, ref.renders)
        difference = max(float((a - b).abs().max()) for a, b in zip(ref.logits, rounded, strict=True))
        scale = max(1.0, max(float(a.abs().max()) for a in ref.logits))
        if difference > tolerance * scale:  # relative: logits of real models reach 40 and more
            raise ExportMismatch(
                f"merged model differs from the adapter model (max logit difference {difference})"
            )
    say(f"writing {out}" + (f" ({gguf_type})" if gguf_type else ""))
    if gguf_type is not None:
        written = write_gguf(
            model,
            tokenizer,
            out,
            gguf_type,
            chat_template=template,
            eot_id=ref.eot_id,
            name=run_dir.resolve().name,
        )
        notes += written.notes
        result = ExportResult(out, gguf_type, notes=notes)
        if verify and gguf_type != "f32":
            round_like_export(model, written.plan)  # the model is not needed any more: round it in place
            rounded = logits_for(model, ref.renders)
    else:
        prepare_model_dir(model, tokenizer, template, ref.eot_id)
        result = ExportResult(save_model_dir(model, tokenizer, out), "merged", notes=notes)
    del model
    gc.collect()
    if verify:
        say("checking the export: reading it back and comparing it with the trained model")
        result.check = check_export(ref, result, tokenizer, rounded)
        result.report = result.check.write(report_path(result.path))
    return result


ADAPTER_NOTE = (
    "a LoRA adapter holds no vocabulary or template: apply it over a GGUF of the base model it was "
    "trained on (llama-cli -m base.gguf --lora {name})"
)


def dequantized_adapter_model(model: Any) -> Any:
    """The same adapter over the base de-quantized to fp32 (bitsandbytes layers back to nn.Linear).

    A QLoRA run over a full-precision checkpoint loads its base unquantized anyway; one over a
    checkpoint saved quantized would otherwise merge into 4-bit weights and quantize the merge again.
    The export check then compares against this de-quantized model, the one the export holds."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    config = model.peft_config["default"]
    state = get_peft_model_state_dict(model)
    base = model.unload().dequantize()
    for parameter in base.parameters():
        if parameter.is_floating_point():
            parameter.data = parameter.data.float()
    dequantized = get_peft_model(base, config)
    set_peft_model_state_dict(dequantized, state)
    return dequantized.eval()


def export_adapter(
    run_dir: Path, out: Path, type_name: str, *, verify: bool = True, say: Callable[[str], None] = log.info
) -> ExportResult:
    """Write the run's LoRA as a GGUF LoRA adapter; the check rebuilds every adapted weight from the
    file (base + alpha / rank * B @ A) and compares it with the merged model's."""
    from tunesmith.export.gguf_lora import (
        UnsupportedAdapter,
        base_weights,
        check_adapter_type,
        write_lora_gguf,
    )
    from tunesmith.export.verify_lora import verify_lora_gguf

    type_name = check_adapter_type(type_name)
    say(f"loading {run_dir}")
    model, _ = load_for_inference(str(run_dir))
    if not hasattr(model, "merge_and_unload"):
        raise UnsupportedAdapter(
            "--adapter-only: this run holds no LoRA adapter (a full fine-tune); export it with --gguf TYPE"
        )
    say(f"writing {out} (LoRA adapter, {type_name})")
    written = write_lora_gguf(model, out, type_name, name=Path(run_dir).resolve().name)
    result = ExportResult(
        out, f"lora-{type_name}", notes=[*written.notes, ADAPTER_NOTE.format(name=out.name)]
    )
    if verify:
        say("checking the adapter: rebuilding the trained weights from it")
        base = base_weights(model, written.targets)
        merged = base_weights(model.merge_and_unload(), written.targets)
        result.check = verify_lora_gguf(out, written, base, merged)
        result.check.notes = list(result.notes)
        result.report = result.check.write(report_path(out))
    del model
    gc.collect()
    return result


def check_export(ref: Reference, result: ExportResult, tokenizer: Any, rounded: Any = None) -> VerifyResult:
    from tunesmith.export.verify import verify_gguf, verify_model_dir

    if result.kind == "merged":
        check = verify_model_dir(ref, result.path, tokenizer, rounded)
    else:
        check = verify_gguf(ref, result.path, result.kind, tokenizer, rounded)
    check.notes = list(result.notes) + check.notes
    return check


def export_run(
    run_dir: Path, out: Path, merge: bool = True, tolerance: float = 1e-3, verify: bool = True
) -> Path:
    """Write safetensors + tokenizer (with the training chat template) + generation config, checked."""
    result = export(run_dir, out, merge=merge, verify=verify, tolerance=tolerance)
    if result.check is not None and not result.check.passed:
        raise ExportMismatch(
            f"the export at {result.path} failed the behaviour check: {result.check.failures()}"
        )
    return result.path
