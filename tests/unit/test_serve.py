"""The OpenAI-compatible server, checked with the official `openai` client against a live server.

Exactness first: the engine's greedy tokens equal transformers' `generate`, alone and batched with
other requests that join and leave mid-decode, on every tiny architecture; its log-probabilities in
a batch equal those of the same request alone. Then the HTTP surface: plain and streaming chat,
completions, adapters by name (each equal to its own in-process generation), 8 concurrent streams
each receiving its own answer, stop strings, disconnects that stop generation, the API key, and every
bad input answered with an OpenAI-style error body, never a 500 or a hang.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tunesmith.serve.adapters import ServeSetupError, load_model_set
from tunesmith.serve.engine import FINISH_CANCELLED, Engine
from tunesmith.serve.sampling import SamplingParams
from tunesmith.serve.server import ServerThread
from tunesmith.serve.settings import ServeSettings
from tunesmith.serve.textgen import IncrementalDecoder, TextStream

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")  # the `serve` extra and the official client (dev extra)
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


def create_app(*args: Any, **kwargs: Any) -> Any:
    from tunesmith.serve.app import create_app as create

    return create(*args, **kwargs)


KEY = "test-key-123"
QUESTIONS = [
    "What is your name?",
    "Who made you?",
    "Tell me a long story about a cat who learned to play the piano in a small town by the sea.",
    "2 + 2?",
    "Name a colour.",
    "Why is the sky blue? Explain it simply, with an example or two.",
    "Hi",
    "Say hello.",
]
CONTEXT = 1024
MAX_TOKENS_CAP = 1000


# -- helpers ----------------------------------------------------------------------------------------


def make_adapter(base_dir: Path, out: Path, seed: int, scale: float = 0.3) -> Path:
    """A LoRA adapter with random B (a trained-looking adapter in seconds): standard PEFT files."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"])
    peft_model = get_peft_model(model, config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * scale)
    peft_model.save_pretrained(out)
    return out


def as_run_dir(adapter_dir: Path, run: Path, base_dir: Path) -> Path:
    """Wrap an adapter the way `train` leaves a finished LoRA run (run_dir.save_final's run.json)."""
    import shutil

    shutil.copytree(adapter_dir, run / "adapter")
    info = {"base_model": str(base_dir), "model_spec": str(base_dir), "kind": "adapter", "method": "sft"}
    (run / "run.json").write_text(json.dumps(info))
    return run


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


@torch.no_grad()
def hf_greedy_ids(model: Any, prompt: list[int], max_new: int, stop_ids: frozenset[int]) -> list[int]:
    """transformers' own greedy decoding: the reference every engine output is held to."""
    ids = torch.tensor([prompt])
    out = model.generate(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=max_new,
        do_sample=False,
        eos_token_id=sorted(stop_ids) or None,
        pad_token_id=0,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    new = out[0, len(prompt) :].tolist()
    return new[:-1] if new and new[-1] in stop_ids else new


def hf_greedy_text(
    model: Any, tokenizer: Any, prompt: list[int], max_new: int, stop_ids: frozenset[int]
) -> str:
    return tokenizer.decode(hf_greedy_ids(model, prompt, max_new, stop_ids), skip_special_tokens=True)


def greedy(max_tokens: int, stop_ids: frozenset[int] = frozenset(), logprobs: bool = False) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, stop_token_ids=stop_ids, logprobs=logprobs)


def wait_until(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()


# -- the engine alone -------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral", "gemma", "phi3"])
def test_engine_greedy_equals_hf_generate_alone_and_batched(arch, tiny_model_dirs):
    models = load_model_set(str(tiny_model_dirs[arch]))
    served = next(iter(models.served.values()))
    prompts = [chat_ids(served.tokenizer, q) for q in QUESTIONS[:5]]
    lengths = [24, 9, 30, 17, 24]
    expected = [hf_greedy_ids(models.model, p, n, frozenset()) for p, n in zip(prompts, lengths, strict=True)]
    engine = Engine(models.model, max_context=models.context_length, max_batch=8)
    try:
        assert engine.generate(prompts[0], greedy(lengths[0])).tokens == expected[0]
        # Rows join mid-decode (the last two once the first has 5 tokens) and leave at different steps.
        results: dict[int, list[int]] = {i: [] for i in range(5)}
        done = threading.Event()
        finished: set[int] = set()

        def listener(i: int):
            def on_event(event):
                if event.token is not None:
                    results[i].append(event.token)
                    if i == 0 and len(results[0]) == 5:
                        for late in (3, 4):
                            engine.submit(prompts[late], greedy(lengths[late]), listener(late))
                if event.finish is not None:
                    finished.add(i)
                    if len(finished) == 5:
                        done.set()

            return on_event

        for i in range(3):
            engine.submit(prompts[i], greedy(lengths[i]), listener(i))
        assert done.wait(60)
        assert [results[i] for i in range(5)] == expected
        assert engine.peak_batch >= 3
    finally:
        engine.close()


def test_batched_logprobs_equal_single_request_logprobs(tiny_model_dirs):
    models = load_model_set(str(tiny_model_dirs["llama"]))
    tokenizer = models.served["llama"].tokenizer
    prompts = [chat_ids(tokenizer, q) for q in QUESTIONS]
    engine = Engine(models.model, max_context=models.context_length, max_batch=8)
    try:
        alone = [engine.generate(p, greedy(12, logprobs=True)) for p in prompts]
        outputs: list[Any] = [None] * len(prompts)

        def run(i: int) -> None:
            outputs[i] = engine.generate(prompts[i], greedy(12, logprobs=True))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert engine.peak_batch >= 2
        for single, batched in zip(alone, outputs, strict=True):
            assert batched.tokens == single.tokens
            torch.testing.assert_close(
                torch.tensor(batched.logprobs), torch.tensor(single.logprobs), atol=1e-5, rtol=0
            )
    finally:
        engine.close()


def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model_dirs):
    models = load_model_set(str(tiny_model_dirs["llama"]))
    tokenizer = models.served["llama"].tokenizer
    engine = Engine(models.model, max_context=models.context_length)
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    prompt = chat_ids(tokenizer, "Hi")
    try:
        alone = engine.generate(prompt, params).tokens
        others = [
            threading.Thread(target=engine.generate, args=(chat_ids(tokenizer, q), greedy(20)))
            for q in QUESTIONS
        ]
        for thread in others:
            thread.start()
        together = engine.generate(prompt, params).tokens
        for thread in others:
            thread.join(60)
        other_seed = engine.generate(
            prompt, SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=8)
        ).tokens
    finally:
        engine.close()
    assert together == alone
    assert other_seed != alone


def test_stopping_a_stream_cancels_the_request(tiny_model_dirs):
    models = load_model_set(str(tiny_model_dirs["llama"]))
    engine = Engine(models.model, max_context=models.context_length)
    try:
        events = engine.stream([1, 2, 3, 4], greedy(1500))
        for _ in range(3):
            next(events)
        events.close()
        assert wait_until(lambda: engine.active == 0)
        assert engine.steps < 500  # left long before its 1500 tokens
        assert engine.generate([1, 2, 3], greedy(4)).finish == "length"  # the engine carries on
    finally:
        engine.close()
    with pytest.raises(RuntimeError, match="closed"):  # a closed engine refuses work instead of hanging
        engine.submit([1, 2], greedy(2), lambda event: None)


def test_closing_the_engine_ends_running_requests(tiny_model_dirs):
    models = load_model_set(str(tiny_model_dirs["llama"]))
    engine = Engine(models.model, max_context=models.context_length)
    finishes: list[str] = []
    engine.submit([1, 2, 3], greedy(1500), lambda e: e.finish and finishes.append(e.finish))
    assert wait_until(lambda: engine.active == 1)
    engine.close()
    assert finishes == [FINISH_CANCELLED]


def test_the_synchronous_text_api_matches_the_engine(tiny_model_dirs):
    """What `tunesmith chat` can use: text pieces from the same engine, stop strings included."""
    from tunesmith.serve.local import generate_text, stream_text

    models = load_model_set(str(tiny_model_dirs["llama"]))
    served = models.served["llama"]
    prompt = chat_ids(served.tokenizer, QUESTIONS[0])
    engine = Engine(models.model, max_context=models.context_length)
    try:
        tokens = engine.generate(prompt, greedy(20, served.stop_token_ids)).tokens
        full = served.tokenizer.decode(tokens, skip_special_tokens=True)
        assert generate_text(engine, served.tokenizer, prompt, greedy(20, served.stop_token_ids)) == full
        stop = full[len(full) // 2 : len(full) // 2 + 3]
        pieces = list(stream_text(engine, served.tokenizer, prompt, greedy(20), stop=[stop]))
        assert "".join(pieces) == full[: full.find(stop)]
        assert wait_until(lambda: engine.active == 0)
    finally:
        engine.close()


class _Broken(torch.nn.Module):
    """A model whose forward fails: what an out-of-memory or a kernel bug looks like to the engine."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, **kwargs: Any) -> Any:
        raise RuntimeError("boom")


def test_a_failing_forward_is_an_error_not_a_hang(tokenizer):
    from tunesmith.serve.adapters import ModelSet, ServedModel

    engine = Engine(_Broken(), max_context=128)
    busy = Engine(_Broken(), max_context=128, max_waiting=0)
    served = {"broken": ServedModel("broken", None, tokenizer, frozenset(), "nowhere", 0)}
    models = ModelSet(model=engine.model, served=served, base_name="broken", context_length=128)
    try:
        result = engine.generate([1, 2, 3], greedy(4))
        assert (result.finish, result.tokens) == ("error", []) and "boom" in result.error
        with (
            ServerThread(create_app(engine, models)) as thread,
            ServerThread(create_app(busy, models)) as full,
        ):
            c = openai.OpenAI(base_url=thread.url + "/v1", api_key="x", max_retries=0, timeout=30)
            with pytest.raises(openai.InternalServerError) as plain:
                ask(c, "broken", "Hi", max_tokens=4)
            assert plain.value.body["type"] == "server_error" and "boom" in plain.value.body["message"]
            with pytest.raises(openai.APIError, match="boom"):
                list(ask(c, "broken", "Hi", max_tokens=4, stream=True))
            response = httpx.post(full.url + "/v1/chat/completions", json={**CHAT, "model": "broken"})
            assert response.status_code == 503 and response.json()["error"]["code"] == "overloaded"
    finally:
        engine.close()
        busy.close()


class _NanLogits(torch.nn.Module):
    """A real model whose logits turn non-finite, as after a numerical blow-up."""

    def __init__(self, inner: Any) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, cache: Any = None, **kwargs: Any) -> Any:
        out = self.inner(cache=cache, **kwargs)
        out.logits = out.logits * float("nan")
        return out


def test_non_finite_logits_end_the_request_with_an_error(tiny_model_dirs):
    models = load_model_set(str(tiny_model_dirs["llama"]))
    engine = Engine(_NanLogits(models.model), max_context=models.context_length)
    try:
        for _ in range(2):  # the engine thread survives and answers the next request too
            result = engine.generate([1, 2, 3], SamplingParams(max_tokens=4, temperature=1.0))
            assert result.finish == "error" and "sampling failed" in result.error
    finally:
        engine.close()


def test_incremental_decoding_equals_decoding_the_whole(tokenizer):
    text = "Héllo wörld — naïve café 你好世界 🎉🚀 end"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in piece for piece in pieces)


def test_stop_strings_are_cut_and_never_half_sent(tokenizer):
    ids = tokenizer("The answer is 42. END of story", add_special_tokens=False)["input_ids"]
    stream = TextStream(tokenizer, stop=["END", "zzz"])
    sent, stopped = "", False
    for token in ids:
        piece = stream.push(token)
        sent += piece.text
        assert "EN" not in sent or "END" not in sent
        if piece.stopped:
            stopped = True
            break
    assert stopped and sent == "The answer is 42. "
    unfinished = TextStream(tokenizer, stop=["story!"])
    text = "".join(unfinished.push(t).text for t in ids) + unfinished.finish().text
    assert text == "The answer is 42. END of story"  # a stop string's prefix at the end is released


# -- the server -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model_dirs, tmp_path_factory):
    """Base `llama` + adapter `quill` (a run directory) + adapter `plume` (a PEFT directory), keyed."""
    root = tmp_path_factory.mktemp("serve")
    base = tiny_model_dirs["llama"]
    quill = as_run_dir(make_adapter(base, root / "quill-adapter", seed=1), root / "quill-run", base)
    plume = make_adapter(base, root / "plume", seed=2)
    models = load_model_set(str(base), [("quill", str(quill)), ("plume", str(plume))], max_context=CONTEXT)
    engine = Engine(models.model, max_context=models.context_length, max_batch=8)
    settings = ServeSettings(api_key=KEY, max_tokens=MAX_TOKENS_CAP, max_n=4, max_body_bytes=64 * 1024)
    with ServerThread(create_app(engine, models, settings)) as thread:
        yield {
            "url": thread.url,
            "engine": engine,
            "models": models,
            "quill": quill,
            "plume": plume,
            "base": base,
        }
    engine.close()


class References:
    """Each served model's greedy answer to a question, from its own separately loaded model (computed
    on first use: reference generation is most of this module's time on a busy machine)."""

    def __init__(self, server: dict[str, Any]) -> None:
        self.specs = {"llama": server["base"], "quill": server["quill"], "plume": server["plume"]}
        self.stop_ids = server["models"].served["llama"].stop_token_ids
        self._models: dict[str, Any] = {}
        self._answers: dict[tuple[str, str], str] = {}

    def __getitem__(self, name: str) -> Any:
        return _Answers(self, name)

    def answer(self, name: str, question: str) -> str:
        from tunesmith.infer.loading import load_for_inference

        if (name, question) not in self._answers:
            if name not in self._models:
                self._models[name] = load_for_inference(str(self.specs[name]))
            model, tokenizer = self._models[name]
            ids = chat_ids(tokenizer, question)
            self._answers[name, question] = hf_greedy_text(model, tokenizer, ids, 24, self.stop_ids)
        return self._answers[name, question]


class _Answers:
    def __init__(self, references: References, name: str) -> None:
        self.references, self.name = references, name

    def __getitem__(self, question: str) -> str:
        return self.references.answer(self.name, question)


@pytest.fixture(scope="module")
def references(server):
    return References(server)


def client(server, key: str = KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=server["url"] + "/v1", api_key=key, max_retries=0, timeout=60)


def ask(c: openai.OpenAI, model: str, question: str, **kwargs: Any) -> Any:
    kwargs.setdefault("max_tokens", 24)
    kwargs.setdefault("temperature", 0)
    return c.chat.completions.create(model=model, messages=[{"role": "user", "content": question}], **kwargs)


def test_models_are_listed_by_name(server):
    models = client(server).models.list()
    assert {m.id for m in models.data} == {"llama", "quill", "plume"}
    assert {m.id: m.parent for m in models.data}["quill"] == "llama"
    assert client(server).models.retrieve("plume").id == "plume"


def test_plain_chat_equals_in_process_greedy(server, references, caplog):
    caplog.set_level(logging.INFO, logger="tunesmith.serve.access")
    reply = ask(client(server), "llama", QUESTIONS[0])
    assert reply.choices[0].message.content == references["llama"][QUESTIONS[0]]
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.completion_tokens > 0
    assert reply.usage.prompt_tokens == len(
        chat_ids(server["models"].served["llama"].tokenizer, QUESTIONS[0])
    )


def test_streaming_chat_equals_plain_chat(server, references):
    stream = ask(client(server), "llama", QUESTIONS[2], stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == references["llama"][QUESTIONS[2]]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24


def test_adapters_are_chosen_by_name(server, references):
    c = client(server)
    answers = {
        name: ask(c, name, QUESTIONS[1]).choices[0].message.content for name in ("llama", "quill", "plume")
    }
    assert answers == {name: references[name][QUESTIONS[1]] for name in answers}
    assert len(set(answers.values())) == 3  # three different models, not one answering thrice


def test_completions_continue_raw_text(server):
    from tunesmith.infer.loading import load_for_inference

    model, tokenizer = load_for_inference(str(server["plume"]))
    prompt = "Once upon a time"
    ids = tokenizer(prompt)["input_ids"]
    expected = hf_greedy_text(model, tokenizer, ids, 16, server["models"].served["plume"].stop_token_ids)
    c = client(server)
    result = c.completions.create(model="plume", prompt=prompt, max_tokens=16, temperature=0, logprobs=2)
    assert result.choices[0].text == expected
    assert len(result.choices[0].logprobs.tokens) == result.usage.completion_tokens
    assert all(len(top) == 2 for top in result.choices[0].logprobs.top_logprobs)
    streamed = "".join(
        chunk.choices[0].text
        for chunk in c.completions.create(
            model="plume", prompt=prompt, max_tokens=16, temperature=0, stream=True
        )
        if chunk.choices
    )
    assert streamed == expected
    echoed = c.completions.create(
        model="plume", prompt=[prompt, prompt], max_tokens=16, temperature=0, echo=True
    )
    assert [choice.text for choice in echoed.choices] == [prompt + expected] * 2


def test_eight_concurrent_streams_each_get_their_own_answer(server, references):
    names = ["llama", "quill", "plume", "llama", "quill", "plume", "quill", "llama"]
    got: list[str | None] = [None] * 8
    barrier = threading.Barrier(8)
    engine = server["engine"]
    engine.peak_batch = 0

    def run(i: int) -> None:
        c = client(server)
        barrier.wait()
        stream = ask(c, names[i], QUESTIONS[i], stream=True)
        got[i] = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert got == [references[names[i]][QUESTIONS[i]] for i in range(8)]
    assert engine.peak_batch >= 2  # they really shared decode steps


def test_stop_strings_cut_the_reply(server, references):
    full = references["llama"][QUESTIONS[5]]
    stop = full[len(full) // 2 : len(full) // 2 + 4]
    expected = full[: full.find(stop)]
    c = client(server)
    reply = ask(c, "llama", QUESTIONS[5], stop=[stop, "never-appears"])
    assert reply.choices[0].message.content == expected and reply.choices[0].finish_reason == "stop"
    chunks = list(ask(c, "llama", QUESTIONS[5], stop=stop, stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected


def test_n_choices_with_a_seed_are_reproducible(server):
    c = client(server)
    first = ask(c, "quill", "Hi", n=3, temperature=1.0, seed=11, max_tokens=12)
    second = ask(c, "quill", "Hi", n=3, temperature=1.0, seed=11, max_tokens=12)
    texts = [choice.message.content for choice in first.choices]
    assert texts == [choice.message.content for choice in second.choices]
    assert [choice.index for choice in first.choices] == [0, 1, 2]
    assert len(set(texts)) > 1
    logged = ask(c, "quill", "Hi", logprobs=True, top_logprobs=3, max_tokens=5)
    content = logged.choices[0].logprobs.content
    assert len(content) == 5 and all(len(entry.top_logprobs) == 3 for entry in content)
    assert all(entry.logprob == pytest.approx(entry.top_logprobs[0].logprob) for entry in content)  # greedy


def test_the_api_key_is_required_except_for_health(server):
    with pytest.raises(openai.AuthenticationError) as wrong:
        ask(client(server, key="wrong-key"), "llama", "Hi")
    assert wrong.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong-key").models.list()
    assert httpx.get(server["url"] + "/v1/models").status_code == 401
    assert httpx.get(server["url"] + "/v1/models", headers={"Authorization": KEY}).status_code == 401
    health = httpx.get(server["url"] + "/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_an_unknown_model_is_refused(server):
    with pytest.raises(openai.NotFoundError) as missing:
        ask(client(server), "gpt-4o", "Hi")
    assert missing.value.body == {
        "message": missing.value.body["message"],
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }
    assert "quill" in missing.value.body["message"]


AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "llama", "messages": [{"role": "user", "content": "Hi"}]}


LONG = "word " * 1100  # more tokens than the context


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (b'["a list"]', 400, None, None),
        (b"[" * 30_000 + b"]" * 30_000, 400, None, "invalid_json"),
        ({"model": "llama"}, 400, "messages", "missing_required_parameter"),
        ({**CHAT, "messages": []}, 400, "messages", "invalid_value"),
        ({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role", "invalid_value"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens", "invalid_value"),
        ({**CHAT, "max_tokens": -5}, 400, "max_tokens", "invalid_value"),
        (
            {**CHAT, "max_completion_tokens": MAX_TOKENS_CAP + 1},
            400,
            "max_completion_tokens",
            "invalid_value",
        ),
        ({**CHAT, "n": 5}, 400, "n", None),
        ({**CHAT, "n": 0}, 400, "n", "invalid_value"),
        ({**CHAT, "temperature": 3}, 400, "temperature", "invalid_value"),
        ({**CHAT, "top_p": 0}, 400, "top_p", "invalid_value"),
        ({**CHAT, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop", None),
        (
            {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}]},
            400,
            "tools",
            "unsupported_parameter",
        ),
        (
            {**CHAT, "messages": [{"role": "user", "content": LONG}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        (
            {**CHAT, "max_tokens": 900, "messages": [{"role": "user", "content": "word " * 200}]},
            400,
            "max_tokens",
            "context_length_exceeded",
        ),
        ({**CHAT, "model": "nope"}, 404, "model", "model_not_found"),
        (json.dumps({**CHAT, "pad": "x" * 70_000}).encode(), 413, None, "request_too_large"),
    ],
)
def test_bad_requests_get_openai_error_bodies(server, body, status, param, code):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    response = httpx.post(server["url"] + "/v1/chat/completions", headers=AUTH, timeout=30, **kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["param"], error["code"]) == (param, code)
    assert error["type"] == "invalid_request_error"


def test_completion_errors_and_unknown_routes(server):
    url = server["url"]
    bad_tokens = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "llama", "prompt": [10**9]})
    assert bad_tokens.status_code == 400 and bad_tokens.json()["error"]["param"] == "prompt"
    no_prompt = httpx.post(url + "/v1/completions", headers=AUTH, json={"model": "llama"})
    assert no_prompt.status_code == 400 and no_prompt.json()["error"]["param"] == "prompt"
    for method, path, status in (("GET", "/v1/nothing", 404), ("GET", "/v1/chat/completions", 405)):
        response = httpx.request(method, url + path, headers=AUTH)
        assert response.status_code == status and set(response.json()["error"]) == {
            "message",
            "type",
            "param",
            "code",
        }
    chunked = httpx.post(
        url + "/v1/chat/completions", headers=AUTH, content=iter([b"{", b" " * 70_000, b"}"])
    )  # no Content-Length: the cap holds while reading
    assert chunked.status_code == 413


def test_a_client_that_disconnects_stops_its_generation(server):
    engine = server["engine"]
    assert wait_until(lambda: engine.active == 0)
    body = {**CHAT, "max_tokens": 900, "stream": True}
    steps = engine.steps
    with httpx.stream("POST", server["url"] + "/v1/chat/completions", headers=AUTH, json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
    assert wait_until(lambda: engine.active == 0, timeout=5)
    assert engine.steps - steps < 400
    steps = engine.steps
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server["url"] + "/v1/chat/completions", headers=AUTH, json={**body, "stream": False}, timeout=0.3
        )
    assert wait_until(lambda: engine.active == 0, timeout=5)
    assert engine.steps - steps < 400
    assert ask(client(server), "llama", "Hi", max_tokens=3).usage.completion_tokens == 3  # still serving


@pytest.mark.parametrize("mix", [True, False])
def test_adapters_in_one_batch_or_one_batch_each_give_each_its_own_answer(server, references, mix):
    """Mixed: rows of three adapters share every forward (PEFT's adapter_names). Grouped, the fallback
    for adapters PEFT cannot mix (DoRA): one batch per adapter. Both must equal each model alone."""
    models = server["models"]
    engine = Engine(models.model, max_context=models.context_length, mix_adapters=mix)
    assert engine.routing.mixed == mix
    stop_ids = models.served["llama"].stop_token_ids
    tokenizer = models.served["llama"].tokenizer
    prompt = chat_ids(tokenizer, QUESTIONS[3])
    names = ["llama", "quill", "plume", "quill"]
    tokens: dict[int, list[int]] = {i: [] for i in range(len(names))}
    done = threading.Semaphore(0)

    def listener(i: int):
        def on_event(event):
            if event.token is not None:
                tokens[i].append(event.token)
            if event.finish is not None:
                done.release()

        return on_event

    try:
        for i, name in enumerate(names):  # submitted back to back: they decode side by side
            engine.submit(prompt, greedy(24, stop_ids), listener(i), models.served[name].adapter)
        for _ in names:
            assert done.acquire(timeout=60)
    finally:
        engine.close()
    out = {i: tokenizer.decode(tokens[i], skip_special_tokens=True) for i in tokens}
    assert out == {i: references[name][QUESTIONS[3]] for i, name in enumerate(names)}
    assert engine.peak_batch == (len(names) if mix else 2)  # grouped: the two quill rows share a batch


def test_an_adapter_over_another_base_is_refused(tiny_model_dirs, tmp_path):
    adapter = make_adapter(tiny_model_dirs["qwen2"], tmp_path / "qwen-adapter", seed=3)
    with pytest.raises(ServeSetupError, match="different architecture"):
        load_model_set(str(tiny_model_dirs["llama"]), [("q", str(adapter))])
    with pytest.raises(ServeSetupError, match="used twice"):
        load_model_set(str(tiny_model_dirs["qwen2"]), [("qwen2", str(adapter))])


def test_serve_command_line(tmp_path):
    import argparse

    from tunesmith.cli.serve_cmd import add_serve_parser, parse_adapters
    from tunesmith.config.load import ConfigError

    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        ["serve", "runs/base", "--adapter", "a=runs/a", "--adapter", "b=runs/b=x", "--port", "0"]
    )
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 0, None)
    assert parse_adapters(args.adapter) == [("a", "runs/a"), ("b", "runs/b=x")]
    with pytest.raises(ConfigError, match="NAME=RUN_DIR"):
        parse_adapters(["just-a-path"])


@pytest.mark.slow
def test_two_trained_runs_are_served_as_themselves(tiny_model_dirs, tmp_path):
    """Two real LoRA runs of `tunesmith train`, served side by side: each answers as it does in process."""
    from conftest import IDENTITY_ROWS, base_config, write_chat_jsonl
    from tunesmith.config.load import load_config
    from tunesmith.infer.loading import load_for_inference
    from tunesmith.training.loop import train

    base = tiny_model_dirs["llama"]
    rows = {"quill": IDENTITY_ROWS, "plume": [(q, a[::-1]) for q, a in IDENTITY_ROWS]}
    runs = {}
    for name, data in rows.items():
        data_file = write_chat_jsonl(tmp_path / f"{name}.jsonl", data)
        cfg = base_config(
            base, data_file, tmp_path / name, adapter={"type": "lora", "r": 8}, train={"max_steps": 4}
        )
        train(load_config(cfg), show_progress=False)
        runs[name] = tmp_path / name
    models = load_model_set(str(runs["quill"]), [("plume", str(runs["plume"]))])
    assert set(models.served) == {"llama", "quill", "plume"}
    stop_ids = models.served["llama"].stop_token_ids
    expected = {}
    for name, spec in (("llama", base), *runs.items()):
        model, tokenizer = load_for_inference(str(spec))
        expected[name] = hf_greedy_text(model, tokenizer, chat_ids(tokenizer, QUESTIONS[0]), 24, stop_ids)
    assert len(set(expected.values())) == 3
    engine = Engine(models.model, max_context=models.context_length)
    try:
        with ServerThread(create_app(engine, models)) as thread:
            c = openai.OpenAI(base_url=thread.url + "/v1", api_key="unused", max_retries=0)
            got = {name: ask(c, name, QUESTIONS[0]).choices[0].message.content for name in expected}
    finally:
        engine.close()
    assert got == expected
