"""A validated request body turned into engine work: the served model, prompt ids and per-choice sampling.

Every limit is checked here, before anything reaches the engine, so each refusal is a 400 that names
its field: a prompt longer than the context, max_tokens out of range, n above the cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from tunesmith.serve.adapters import ModelSet, ServedModel
from tunesmith.serve.errors import bad_request, model_not_found
from tunesmith.serve.sampling import SamplingParams
from tunesmith.serve.schemas import ChatRequest, CompletionRequest
from tunesmith.serve.settings import ServeSettings


@dataclass
class Prepared:
    served: ServedModel
    prompts: list[list[int]]
    jobs: list[tuple[list[int], SamplingParams]]  # one per choice: prompt p, choice i at p * n + i
    stop: list[str]

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)


def served_model(models: ModelSet, name: str) -> ServedModel:
    served = models.served.get(name)
    if served is None:
        raise model_not_found(name, list(models.served))
    return served


def prepare_chat(body: ChatRequest, models: ModelSet, settings: ServeSettings) -> Prepared:
    served = served_model(models, body.model)
    tokenizer = served.tokenizer
    if not getattr(tokenizer, "chat_template", None):
        raise bad_request(
            f"The model `{served.name}` has no chat template; use /v1/completions with a plain prompt.",
            "model",
        )
    try:
        encoded = tokenizer.apply_chat_template(
            body.template_messages(), add_generation_prompt=True, return_dict=True
        )
    except Exception as exc:  # the template's own complaint (e.g. roles must alternate) is the user's to fix
        raise bad_request(
            f"The chat template of `{served.name}` refused these messages: {exc}", "messages"
        ) from None
    prompt = list(encoded["input_ids"])
    top = body.top_logprobs or 0
    return _prepare(body, served, [prompt], models, settings, body.logprobs, top, "messages")


def prepare_completion(body: CompletionRequest, models: ModelSet, settings: ServeSettings) -> Prepared:
    served = served_model(models, body.model)
    prompts = body.prompts()
    if not prompts:
        raise bad_request("'prompt' is empty.", "prompt")
    if len(prompts) > settings.max_prompts:
        raise bad_request(
            f"At most {settings.max_prompts} prompts per request, got {len(prompts)}.", "prompt"
        )
    vocab = len(served.tokenizer)
    ids: list[list[int]] = []
    for prompt in prompts:
        if isinstance(prompt, str):
            ids.append(served.tokenizer(prompt)["input_ids"])
        elif any(t < 0 or t >= vocab for t in prompt):
            raise bad_request(f"Token ids in 'prompt' must be in [0, {vocab}).", "prompt")
        else:
            ids.append(list(prompt))
    wants = body.logprobs is not None
    return _prepare(body, served, ids, models, settings, wants, body.logprobs or 0, "prompt")


def _prepare(
    body: ChatRequest | CompletionRequest,
    served: ServedModel,
    prompts: list[list[int]],
    models: ModelSet,
    settings: ServeSettings,
    logprobs: bool,
    top_logprobs: int,
    prompt_param: str,
) -> Prepared:
    if body.n > settings.max_n:
        raise bad_request(f"'n' must be at most {settings.max_n} on this server, got {body.n}.", "n")
    stop = body.stop_list()
    asked, field = body.token_limit()
    context = models.context_length
    jobs = []
    for p, prompt in enumerate(prompts):
        if not prompt:
            raise bad_request("The prompt is empty after tokenization.", prompt_param)
        max_tokens = _max_tokens(asked, field, len(prompt), context, settings, prompt_param)
        for i in range(body.n):
            seed = None if body.seed is None else body.seed + p * body.n + i
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=1.0 if body.temperature is None else body.temperature,
                top_p=1.0 if body.top_p is None else body.top_p,
                seed=seed,
                stop_token_ids=served.stop_token_ids,
                logprobs=logprobs,
                top_logprobs=top_logprobs,
            )
            jobs.append((prompt, params))
    return Prepared(served, prompts, jobs, stop)


def _max_tokens(
    asked: int | None, field: str, prompt_len: int, context: int, settings: ServeSettings, prompt_param: str
) -> int:
    if prompt_len >= context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_len}. "
            "Shorten the prompt.",
            prompt_param,
            "context_length_exceeded",
        )
    if asked is None:
        return min(settings.max_tokens, context - prompt_len)
    if asked < 1:
        raise bad_request(f"'{field}' must be at least 1, got {asked}.", field, "invalid_value")
    if asked > settings.max_tokens:
        raise bad_request(
            f"'{field}' must be at most {settings.max_tokens} on this server, got {asked}.",
            field,
            "invalid_value",
        )
    if prompt_len + asked > context:
        raise bad_request(
            f"This model's maximum context length is {context} tokens; the prompt has {prompt_len} and "
            f"'{field}' asks for {asked} more. Lower '{field}' or shorten the prompt.",
            field,
            "context_length_exceeded",
        )
    return asked


def echo_text(served: ServedModel, prompt: list[int]) -> str:
    return served.tokenizer.decode(prompt, skip_special_tokens=False)
