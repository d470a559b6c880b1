"""The behaviour check: does the exported artifact behave like the model that was trained?

The export is read back by an independent reader (transformers' own GGUF loader and its GGUF
tokenizer for a .gguf; plain `AutoModelForCausalLM` / `AutoTokenizer` for a merged directory) and
compared with the trained model (base + adapter, unmerged, in memory) on a few conversations:

- chat template: each conversation renders to the same token ids with the export's own template
  and tokenizer as with the training template and the trained tokenizer;
- end of turn: the export names the token the template ends a turn with (GGUF `eot_token_id`; a
  model directory's generation_config `eos_token_id`), and the same EOS;
- the file computes what it should: next-token logits at every position of those conversations,
  against the trained model with its weights rounded in memory exactly as the file stores them
  (`FIDELITY`, the same for every type). A wrong tensor layout, norm offset, hyperparameter or a
  corrupted tensor fails here whatever the type;
- what the type costs: the same logits against the trained model itself. For f32/f16/bf16 (and a
  merged directory) the largest absolute difference relative to the logit scale; for the block
  types the mean KL divergence per token and the top-1 agreement where the trained model is
  confident. Bounds are in `CRITERIA`, with the measurements they come from;
- where llama-cpp-python is installed, the same comparisons with llama.cpp reading the file, its own
  tokenizer tokenizing each conversation rendered with the file's template, and its end-of-turn id
  (`verify_llama_cpp`); absent, a note says so.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

CONVERSATIONS: list[list[dict[str, str]]] = [
    [{"role": "user", "content": "What is your name?"}],
    [
        {"role": "system", "content": "You are a concise assistant."},
        {"role": "user", "content": "Write one sentence about the sea."},
    ],
    [
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "12 + 30 is 42."},
        {"role": "user", "content": "And doubled?"},
    ],
    [
        {"role": "user", "content": "Say 'good morning' in French and Spanish. ¿Qué tal? 🚀"},
        {"role": "assistant", "content": "Bonjour. Buenos días."},
    ],
]


@dataclass(frozen=True)
class Criteria:
    """Pass when every set bound holds. `max_rel_diff`: max |logit diff| / max(1, max |reference logit|);
    `min_top1`: top-1 agreement at the positions where the trained model is confident (CONFIDENT)."""

    max_rel_diff: float | None = None
    max_kl: float | None = None
    min_top1: float | None = None


FIDELITY = 1e-4
"""The export read back vs the trained model with its weights rounded in memory exactly as the file
stores them (`gguf_writer.round_like_export`): the same numbers, so only float summation order differs
(measured 0 to 3e-7 of the logit scale). A wrong layout, offset, hyperparameter or a corrupted tensor
shows here whatever the type; the per-type CRITERIA below judge what the rounding itself costs."""

CRITERIA: dict[str, Criteria] = {
    # Rounding types: max |diff| relative to the logit scale. Measured on SmolLM2-135M + a trained LoRA:
    # f32 2.6e-6 (the merge's own rounding), f16 1.4e-3, bf16 1.2e-2; tiny models at most half that.
    "merged": Criteria(max_rel_diff=1e-4),
    "f32": Criteria(max_rel_diff=1e-4),
    "f16": Criteria(max_rel_diff=5e-3),
    "bf16": Criteria(max_rel_diff=4e-2),
    # Block types: what the rounding may cost, about 2.5-4x the worst measured on SmolLM2-135M (base and
    # trained), a small model whose weights already come from a Q4_1 file, so 4/5-bit types quantize
    # it a second time: q8_0 KL 1.9e-3-2.4e-3, confident top-1 100%; q5_0/q5_1 KL 0.13-0.28, 91-96%;
    # q4_1 0.17, 94%; q4_0 0.53-0.62, 83%; q6_k 8.1e-3-1.2e-2, 100%; q4_k_m 0.066-0.082, 98%; q5_k_m
    # 0.158, 97% (on SmolLM2 the K-quants are partly q8_0 / q5_0 / q5_1: rows of 576 values do not fill
    # 256-value super-blocks).
    # Larger models lose far less; a broken file, far more (and fails "file matches its weights").
    "q8_0": Criteria(max_kl=1e-2, min_top1=0.95),
    "q6_k": Criteria(max_kl=3e-2, min_top1=0.95),
    "q5_0": Criteria(max_kl=0.75, min_top1=0.8),
    "q5_1": Criteria(max_kl=0.75, min_top1=0.8),
    "q4_0": Criteria(max_kl=1.5, min_top1=0.7),
    "q4_1": Criteria(max_kl=1.5, min_top1=0.7),
    "q5_k_m": Criteria(max_kl=0.75, min_top1=0.8),
    "q4_k_m": Criteria(max_kl=1.5, min_top1=0.7),
}


CONFIDENT = 0.5
"""Top-1 agreement is judged where the trained model gives its top token at least this probability:
there the top token is unambiguous, while near-ties flip under any rounding without changing much."""


@dataclass
class Render:
    conversation: int
    generation_prompt: bool
    ids: list[int]


@dataclass
class Reference:
    """What the trained model does, computed before merging: renders, their logits, the special ids."""

    template: str | None
    eot_id: int | None
    eos_id: int | None
    renders: list[Render]
    logits: list[torch.Tensor]


@dataclass
class Check:
    name: str
    passed: bool
    detail: str


@dataclass
class VerifyResult:
    export: str
    type: str
    passed: bool
    checks: list[Check]
    metrics: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"behaviour check ({self.type}): {'passed' if self.passed else 'FAILED'}"]
        lines += [f"  {'ok  ' if c.passed else 'FAIL'} {c.name}: {c.detail}" for c in self.checks]
        lines += [f"  note: {note}" for note in self.notes]
        return "\n".join(lines)

    def failures(self) -> str:
        return "; ".join(f"{c.name}: {c.detail}" for c in self.checks if not c.passed)

    def write(self, path: Path) -> Path:
        from tunesmith.training.durable import write_text_atomic

        write_text_atomic(path, json.dumps(asdict(self), indent=1, ensure_ascii=False) + "\n")
        return path


# --- the trained model's side -------------------------------------------------------------------


def end_of_turn_id(tokenizer: Any, template: str | None) -> int | None:
    """The token the template writes right after an assistant reply (`<|im_end|>`, `<|eot_id|>`,
    `<end_of_turn>`); the tokenizer's EOS when the template writes plain text or nothing there."""
    marker = "Tunesmith-end-of-turn-probe"
    conversation = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=False)
    except Exception:  # a template that cannot render this conversation: fall back to EOS
        text = ""
    if marker in text:
        tail = text[text.rindex(marker) + len(marker) :]
        special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
        for token_id in tokenizer(tail, add_special_tokens=False)["input_ids"]:
            if token_id in special:
                return int(token_id)
    return tokenizer.eos_token_id


def _ids(encoded: Any) -> list[int]:
    """apply_chat_template(tokenize=True) gives a list or, in some versions, a BatchEncoding."""
    if hasattr(encoded, "keys"):
        encoded = encoded["input_ids"]
    return [int(i) for i in encoded]


def _renders(tokenizer: Any, template: str | None) -> list[Render]:
    renders = []
    for index, conversation in enumerate(CONVERSATIONS):
        prompts = [True, False] if conversation[-1]["role"] == "user" else [False]
        for generation_prompt in prompts:
            try:
                ids = tokenizer.apply_chat_template(
                    conversation,
                    chat_template=template,
                    add_generation_prompt=generation_prompt,
                    tokenize=True,
                )
            except Exception:  # e.g. a template that refuses system messages: not a conversation it has
                continue
            renders.append(Render(index, generation_prompt, _ids(ids)))
    return renders


@torch.no_grad()
def logits_for(model: Any, renders: list[Render]) -> list[torch.Tensor]:
    device = next(model.parameters()).device
    out = []
    for render in renders:
        ids = torch.tensor([render.ids], device=device)
        out.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float().cpu())
    return out


def reference(model: Any, tokenizer: Any, template: str | None) -> Reference:
    model.eval()
    renders = _renders(tokenizer, template) if template is not None else []
    if not renders:  # no template (a base model), or one that renders none of the conversations
        renders = [Render(-1, False, tokenizer("The sea is wide and blue.")["input_ids"])]
    return Reference(
        template,
        end_of_turn_id(tokenizer, template),
        tokenizer.eos_token_id,
        renders,
        logits_for(model, renders),
    )


# --- comparisons ---------------------------------------------------------------------------------


def logit_metrics(expected: list[torch.Tensor], got: list[torch.Tensor]) -> dict[str, float]:
    a = torch.cat(expected).double()
    b = torch.cat(got).double()
    log_a, log_b = a.log_softmax(-1), b.log_softmax(-1)
    kl = (log_a.exp() * (log_a - log_b)).sum(-1)
    scale = float(a.abs().max())
    max_abs = float((a - b).abs().max())
    agree = a.argmax(-1) == b.argmax(-1)
    confident = log_a.max(-1).values.exp() >= CONFIDENT
    return {
        "max_abs_diff": max_abs,
        "max_rel_diff": max_abs / max(1.0, scale),
        "max_abs_logit": scale,
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
        "top1_agreement": float(agree.double().mean()),
        "confident_positions": int(confident.sum()),
        "top1_agreement_confident": float(agree[confident].double().mean()) if confident.any() else 1.0,
        "positions": int(a.shape[0]),
    }


def _fidelity_check(metrics: dict[str, float]) -> Check:
    value = metrics["max_rel_diff"]
    ok = value <= FIDELITY
    detail = (
        f"max |diff| {metrics['max_abs_diff']:.3g} ({value:.2g} of the logit scale, bound {FIDELITY:g}) "
        f"against the trained weights rounded as the file stores them"
    )
    return Check(
        "file matches its weights", ok, detail + ("" if ok else ": the file computes something else")
    )


def _logit_check(metrics: dict[str, float], criteria: Criteria) -> Check:
    problems, shown = [], []
    if criteria.max_rel_diff is not None:
        value, bound = metrics["max_rel_diff"], criteria.max_rel_diff
        shown.append(
            f"max |diff| {metrics['max_abs_diff']:.3g} ({value:.2g} of the logit scale, bound {bound:g})"
        )
        if not value <= bound:
            problems.append("logits differ beyond the tolerance")
    if criteria.max_kl is not None:
        value, bound = metrics["mean_kl"], criteria.max_kl
        shown.append(f"mean KL {value:.3g} (bound {bound:g})")
        if not value <= bound:
            problems.append("the next-token distributions differ beyond the tolerance")
    if criteria.min_top1 is not None:
        value, bound = metrics["top1_agreement_confident"], criteria.min_top1
        shown.append(
            f"top-1 agreement {value:.1%} at the {metrics['confident_positions']} positions where the trained "
            f"model is confident (bound {bound:.0%}; {metrics['top1_agreement']:.1%} at all)"
        )
        if not value >= bound:
            problems.append("the most likely next token differs too often")
    detail = ", ".join(shown) + f" over {metrics['positions']} positions"
    return Check(
        "next-token logits vs the trained model",
        not problems,
        detail + ("" if not problems else ": " + "; ".join(problems)),
    )


def _first_difference(a: list[int], b: list[int]) -> str:
    at = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    left = a[at] if at < len(a) else "end"
    right = b[at] if at < len(b) else "end"
    return f"first difference at token {at}: export {right}, trained {left}"


def _template_check(
    ref: Reference, reader_tokenizer: Any, export_template: str | None, sentencepiece: bool = False
) -> Check:
    """Same template text, and the same token ids when the export's tokenizer renders each conversation.

    `sentencepiece`: the file holds a SentencePiece vocabulary, which transformers' GGUF tokenizer reads
    with a Metaspace pre-tokenizer that drops the '▁' SentencePiece puts at the start of the text and
    after special tokens (llama.cpp keeps it, as the original does: measured on a Llama-2-style
    tokenizer). Renderings that differ only by such standalone '▁' tokens count as identical."""
    if ref.template is None:
        return Check("chat template", export_template is None, "the trained tokenizer has no chat template")
    if export_template != ref.template:
        return Check("chat template", False, "the export's chat template is not the one training used")
    space = reader_tokenizer.convert_tokens_to_ids("\u2581") if sentencepiece else None
    lenient = 0
    for render in ref.renders:
        if render.conversation < 0:
            continue
        conversation = CONVERSATIONS[render.conversation]
        ids = _ids(
            reader_tokenizer.apply_chat_template(
                conversation, add_generation_prompt=render.generation_prompt, tokenize=True
            )
        )
        if ids == render.ids:
            continue
        if isinstance(space, int) and [i for i in ids if i != space] == [i for i in render.ids if i != space]:
            lenient += 1
            continue
        return Check(
            "chat template",
            False,
            f"conversation {render.conversation + 1} renders to other token ids "
            f"({_first_difference(render.ids, ids)})",
        )
    detail = f"{len(ref.renders)} renderings give identical token ids"
    if lenient:
        detail += (
            f" ({lenient} apart from the standalone '▁' that transformers' GGUF tokenizer drops after "
            "special tokens and llama.cpp keeps)"
        )
    return Check("chat template", True, detail)


def _name(tokenizer: Any, token_id: int | None) -> str:
    if token_id is None:
        return "none"
    try:
        return f"{token_id} ({tokenizer.convert_ids_to_tokens(int(token_id))})"
    except Exception:
        return str(token_id)


def _token_check(name: str, expected: int | None, got: Any, tokenizer: Any) -> Check:
    ok = expected is None or (expected in got if isinstance(got, list) else got == expected)
    shown = ", ".join(_name(tokenizer, g) for g in got) if isinstance(got, list) else _name(tokenizer, got)
    return Check(name, ok, f"export {shown}; trained model {_name(tokenizer, expected)}")


def _judge(
    export: Path,
    type_name: str,
    got: list[torch.Tensor],
    ref: Reference,
    rounded: list[torch.Tensor] | None,
    checks: list[Check],
) -> VerifyResult:
    """Logit checks first: against the rounded weights (when given) and against the trained model."""
    metrics = logit_metrics(ref.logits, got)
    logit_checks = [_logit_check(metrics, CRITERIA[type_name])]
    if rounded is not None:
        fidelity = logit_metrics(rounded, got)
        metrics.update({f"file_{key}": value for key, value in fidelity.items() if "diff" in key})
        logit_checks.insert(0, _fidelity_check(fidelity))
    checks = logit_checks + checks
    return VerifyResult(str(export), type_name, all(c.passed for c in checks), checks, metrics)


# --- readers -------------------------------------------------------------------------------------


def gguf_field(reader: Any, key: str) -> Any:
    field_ = reader.get_field(key)
    return None if field_ is None else field_.contents()


def verify_gguf(
    ref: Reference, path: Path, type_name: str, tokenizer: Any, rounded: list[torch.Tensor] | None = None
) -> VerifyResult:
    """Read `path` with transformers' GGUF loader and compare it with `ref` (and with `rounded`: the
    logits of the trained model with its weights rounded as the file stores them).

    The file is read through a folder that holds nothing else: beside tokenizer files transformers
    would mix their settings into the GGUF's tokenizer, and the check would no longer be independent."""
    import tempfile

    from gguf import GGUFReader

    reader = GGUFReader(path)
    eot, eos = (
        gguf_field(reader, "tokenizer.ggml.eot_token_id"),
        gguf_field(reader, "tokenizer.ggml.eos_token_id"),
    )
    template = gguf_field(reader, "tokenizer.chat_template")
    sentencepiece = gguf_field(reader, "tokenizer.ggml.model") == "llama"
    del reader
    with tempfile.TemporaryDirectory(prefix="tunesmith-verify-") as folder:
        alone = Path(folder) / path.name
        try:
            alone.symlink_to(path.resolve())
        except OSError:  # no symlinks here: a copy reads the same
            import shutil

            shutil.copyfile(path, alone)
        reader_tokenizer, model = _read_gguf(alone)
        checks = [
            _template_check(ref, reader_tokenizer, template, sentencepiece),
            _token_check("end-of-turn token", ref.eot_id, eot, tokenizer),
            _token_check("eos token", ref.eos_id, eos, tokenizer),
        ]
        got = logits_for(model, ref.renders)
        del model
    result = _judge(path, type_name, got, ref, rounded, checks)
    _add_llama_cpp_reading(result, ref, path, template, tokenizer, rounded)
    return result


def _add_llama_cpp_reading(
    result: VerifyResult,
    ref: Reference,
    path: Path,
    template: str | None,
    tokenizer: Any,
    rounded: list[torch.Tensor] | None,
) -> None:
    """The same comparisons with llama.cpp reading the file, when llama-cpp-python is installed."""
    from tunesmith.export import verify_llama_cpp

    if not verify_llama_cpp.available():
        result.notes.append(verify_llama_cpp.NOT_INSTALLED)
        return
    texts = (
        verify_llama_cpp.render_texts(tokenizer, template, CONVERSATIONS, ref.renders)
        if template is not None
        else [None] * len(ref.renders)
    )
    read = verify_llama_cpp.read(path, texts, [render.ids for render in ref.renders])
    metrics = logit_metrics(ref.logits, read["logits"])
    logit_check = _logit_check(metrics, verify_llama_cpp.criteria_for(CRITERIA[result.type]))
    checks = [Check(f"llama.cpp: {logit_check.name}", logit_check.passed, logit_check.detail)]
    if rounded is not None:
        fidelity = logit_metrics(rounded, read["logits"])
        metrics.update({f"file_{key}": fidelity[key] for key in ("mean_kl", "max_rel_diff")})
        bound = verify_llama_cpp.LLAMA_CPP_FIDELITY_KL
        ok = fidelity["mean_kl"] <= bound
        checks.insert(
            0,
            Check(
                "llama.cpp: file matches its weights",
                ok,
                f"mean KL {fidelity['mean_kl']:.3g} (bound {bound:g}) against the trained weights rounded "
                "as the file stores them" + ("" if ok else ": llama.cpp computes something else"),
            ),
        )
    mismatch = next(
        (
            (render, tokens)
            for render, tokens in zip(ref.renders, read["tokens"], strict=True)
            if tokens is not None and tokens != render.ids
        ),
        None,
    )
    rendered = sum(tokens is not None for tokens in read["tokens"])
    if mismatch is None:
        checks.append(
            Check(
                "llama.cpp: chat template",
                True,
                f"{rendered} renderings with the file's template give identical token ids in llama.cpp",
            )
        )
    else:
        render, tokens = mismatch
        checks.append(
            Check(
                "llama.cpp: chat template",
                False,
                f"conversation {render.conversation + 1} tokenizes to other ids in llama.cpp "
                f"({_first_difference(render.ids, tokens)})",
            )
        )
    checks.append(_token_check("llama.cpp: end-of-turn token", ref.eot_id, read["eot"], tokenizer))
    result.checks += checks
    result.metrics.update({f"llama_cpp_{key}": value for key, value in metrics.items()})
    result.passed = all(check.passed for check in result.checks)


def _read_gguf(path: Path) -> tuple[Any, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return tokenizer, model


def verify_model_dir(
    ref: Reference, out: Path, tokenizer: Any, rounded: list[torch.Tensor] | None = None
) -> VerifyResult:
    """Read a merged model directory with plain transformers and compare it with `ref` (and with
    `rounded`: the merged model's logits in memory, before it was saved)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    reader_tokenizer = AutoTokenizer.from_pretrained(out)
    try:
        eos_ids = GenerationConfig.from_pretrained(out).eos_token_id
    except OSError:
        eos_ids = None
    eos_ids = [] if eos_ids is None else [eos_ids] if isinstance(eos_ids, int) else list(eos_ids)
    template = getattr(reader_tokenizer, "chat_template", None)
    checks = [
        _template_check(ref, reader_tokenizer, template),
        _token_check("end-of-turn token (generation_config eos_token_id)", ref.eot_id, eos_ids, tokenizer),
        _token_check("eos token", ref.eos_id, reader_tokenizer.eos_token_id, tokenizer),
    ]
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    got = logits_for(model, ref.renders)
    del model
    return _judge(out, "merged", got, ref, rounded, checks)


def report_path(export: Path) -> Path:
    """`verify.json` inside a merged directory; `NAME.verify.json` beside a .gguf file."""
    return export / "verify.json" if export.is_dir() else export.with_name(f"{export.stem}.verify.json")
