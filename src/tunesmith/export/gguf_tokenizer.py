"""The tokenizer as GGUF metadata: vocabulary, merges, token types, special ids, chat template.

Read from the fast tokenizer's own `tokenizer.json` (every tokenizer transformers 5 loads has one) and
written under llama.cpp's keys, as its `convert_hf_to_gguf.py` does:

- byte-level BPE (GPT-2 style: SmolLM, Llama 3, Qwen2) -> `tokenizer.ggml.model = gpt2`, with the
  merges and the pre-tokenizer name llama.cpp recognises by hashing the ids of a fixed text;
- BPE with byte fallback (SentencePiece converted: Llama 2, Mistral, Gemma) -> `llama`, with a score
  per token (earlier tokens merge first) and `<0xNN>` byte tokens typed BYTE.

Added tokens marked special (or looking like `<|...|>`) are CONTROL, other added tokens USER_DEFINED,
ids the vocabulary does not fill (an embedding padded past the tokenizer) `[PADn]` UNUSED.
"""

from __future__ import annotations

import json
import re
from hashlib import sha256
from typing import Any

# llama.cpp's pre-tokenizer probe text (convert_hf_to_gguf.py, get_vocab_base_pre) and the hashes of
# the ids it gives, for the tokenizers of the supported families.
_PROBE_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
_PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",
}

_BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class UnsupportedTokenizer(ValueError):
    pass


def looks_special(token: str) -> bool:
    """llama.cpp's heuristic for added tokens that ought to be control tokens."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def tokenizer_json(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UnsupportedTokenizer(
            f"GGUF export needs a fast tokenizer (tokenizer.json); {type(tokenizer).__name__} has none"
        )
    return json.loads(backend.to_str())


def _has_type(node: Any, kind: str) -> bool:
    if isinstance(node, dict):
        return node.get("type") == kind or any(_has_type(v, kind) for v in node.values())
    if isinstance(node, list):
        return any(_has_type(v, kind) for v in node)
    return False


def _merges(model: dict[str, Any]) -> list[str]:
    """`a b` strings; a space inside a part is written as U+0120+256 shifted, as gguf's SpecialVocab does."""
    out = []
    for merge in model.get("merges") or []:
        if isinstance(merge, str):
            out.append(merge)
        else:
            out.append(
                " ".join("".join(chr(ord(c) + 256) if c == " " else c for c in part) for part in merge)
            )
    return out


def pre_tokenizer_name(tokenizer: Any) -> str | None:
    ids = tokenizer.encode(_PROBE_TEXT)
    return _PRE_TOKENIZERS.get(sha256(str(ids).encode()).hexdigest())


def write_tokenizer(
    writer: Any, tokenizer: Any, n_vocab: int, chat_template: str | None, eot_id: int | None, arch: str
) -> list[str]:
    """Write the vocabulary and special tokens; return notes on what llama.cpp will do differently."""
    import gguf

    notes: list[str] = []
    spec = tokenizer_json(tokenizer)
    model = spec["model"]
    if model.get("type") != "BPE":
        raise UnsupportedTokenizer(
            f"GGUF export supports BPE tokenizers (byte-level or with byte fallback); this one is "
            f"{model.get('type')!r}"
        )
    byte_level = not model.get("byte_fallback") and (
        _has_type(spec.get("pre_tokenizer"), "ByteLevel") or _has_type(spec.get("decoder"), "ByteLevel")
    )
    if not byte_level and not model.get("byte_fallback"):
        raise UnsupportedTokenizer(
            "GGUF export: a BPE tokenizer that is neither byte-level nor byte-fallback"
        )

    vocab: dict[int, str] = {index: token for token, index in model["vocab"].items()}
    added = {item["id"]: item for item in spec.get("added_tokens", [])}
    for index, item in added.items():
        vocab[index] = item["content"]
    if max(vocab) >= n_vocab:
        raise UnsupportedTokenizer(
            f"the tokenizer has token id {max(vocab)} but the model's embedding has only {n_vocab} rows"
        )
    unk = model.get("unk_token")
    tokens: list[str] = []
    types: list[int] = []
    scores: list[float] = []
    for index in range(n_vocab):
        token = vocab.get(index)
        score = -float(index)
        if token is None:
            token, kind, score = f"[PAD{index}]", gguf.TokenType.UNUSED, -1000.0
        elif index in added:
            if added[index].get("special") or looks_special(token):
                kind, score = gguf.TokenType.CONTROL, 0.0
            else:
                token = token.replace("\u2581", " ")  # llama.cpp pre-normalizes user-defined spaces
                kind, score = gguf.TokenType.USER_DEFINED, -1000.0
        elif not byte_level and _BYTE_TOKEN.fullmatch(token):
            kind, score = gguf.TokenType.BYTE, 0.0
        elif not byte_level and token == unk:
            kind, score = gguf.TokenType.UNKNOWN, 0.0
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(token)
        types.append(int(kind))
        scores.append(score)

    if byte_level:
        writer.add_tokenizer_model("gpt2")
        pre = pre_tokenizer_name(tokenizer)
        if pre is None:
            pre = "default"
            notes.append(
                "llama.cpp does not know this tokenizer's pre-tokenizer: it is written as 'default', which may "
                "split text (digits, whitespace) differently from the original"
            )
        writer.add_tokenizer_pre(pre)
    else:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_scores(scores)
        writer.add_add_space_prefix(arch != "GEMMA3" and _adds_space_prefix(spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if merges := _merges(model):
        writer.add_token_merges(merges)

    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            getattr(writer, f"add_{kind}_token_id")(token_id)
    if eot_id is not None:
        writer.add_eot_token_id(int(eot_id))
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(len(probe) > 1 and eos is not None and probe[-1] == eos)
    if chat_template:
        writer.add_chat_template(chat_template)
    return notes


def _adds_space_prefix(spec: dict[str, Any]) -> bool:
    """SentencePiece's leading '▁': a Metaspace pre-tokenizer that prepends, or a Prepend normalizer."""
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or ('"Metaspace"' in text and '"prepend_scheme": "never"' not in text)
