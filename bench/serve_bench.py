"""The serving engine against transformers `generate`, on the default model.

    .venv/bin/python bench/serve_bench.py                                   # the real run (minutes)
    .venv/bin/python bench/serve_bench.py --model DIR --new-tokens 8 --clients 1 2 --repeats 1  # smoke

1. One stream, in process: greedy decoding of `--new-tokens` tokens (stop tokens ignored, so both
   make exactly that many) by `model.generate` and by the engine; tokens/s over the whole request
   (prefill included, as a user waits for it), the engine's time to first token, and whether the
   two produced the same tokens.
2. Concurrent clients over HTTP: C clients of the official `openai` package stream chat completions
   from a live server at the same moment (temperature 0, `--new-tokens` each, the reply may end
   sooner at the end-of-turn token); aggregate completion tokens/s over the wall time from the
   first request to the last token, and time to first token (median, max) per client. The same C
   prompts through one static `generate` call (left-padded batch) are the baseline a user would
   write instead.

Runs are interleaved and repeated (`--repeats`, medians reported) because these machines are shared.
Results: the markdown table on stdout and JSON (--results).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

from side_by_side import cpu_name  # noqa: E402

QUESTIONS = [
    "Write a long story about a lighthouse keeper who befriends a whale.",
    "Explain in detail how a bicycle stays upright while moving.",
    "Describe a walk through a busy market in the morning, in many sentences.",
    "Tell me everything you know about the history of bread.",
    "Write a letter to a friend about learning to play the violin.",
    "Explain how rain forms, step by step, for a curious child.",
    "Describe the life of a honeybee from egg to forager.",
    "Write a detailed recipe for vegetable soup, with tips.",
]


def chat_ids(tokenizer: Any, question: str) -> list[int]:
    messages = [{"role": "user", "content": question}]
    return list(
        tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"]
    )


@torch.inference_mode()
def hf_generate(
    model: Any, tokenizer: Any, prompts: list[list[int]], new_tokens: int
) -> tuple[float, list[list[int]]]:
    """Static batched greedy `generate` (left-padded when several): seconds and the new tokens per row."""
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id or 0
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    started = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad,
        temperature=None,
        top_p=None,
        top_k=None,
    )
    return time.perf_counter() - started, [row[width:].tolist() for row in out]


def engine_stream(engine: Any, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
    """One request on the engine: seconds, time to first token, tokens."""
    from tunesmith.serve.sampling import SamplingParams

    params = SamplingParams(max_tokens=new_tokens, temperature=0.0)
    started = time.perf_counter()
    first, tokens = None, []
    for event in engine.stream(prompt, params):
        if event.token is not None:
            first = first or time.perf_counter() - started
            tokens.append(event.token)
    return time.perf_counter() - started, first or 0.0, tokens


def http_clients(url: str, model: str, clients: int, new_tokens: int) -> dict[str, float]:
    """C concurrent streaming chat requests; aggregate tokens/s and time to first token."""
    import openai

    barrier = threading.Barrier(clients)
    ttft: list[float] = [0.0] * clients
    tokens: list[int] = [0] * clients
    ends: list[float] = [0.0] * clients
    starts: list[float] = [0.0] * clients

    def run(i: int) -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key="bench", max_retries=0, timeout=600)
        barrier.wait()
        starts[i] = time.perf_counter()
        stream = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}],
            max_tokens=new_tokens,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content and not ttft[i]:
                ttft[i] = time.perf_counter() - starts[i]
            if chunk.usage is not None:
                tokens[i] = chunk.usage.completion_tokens
        ends[i] = time.perf_counter()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = max(ends) - min(starts)
    return {
        "tokens": sum(tokens),
        "wall_s": wall,
        "tokens_per_s": sum(tokens) / wall,
        "ttft_median_s": statistics.median(ttft),
        "ttft_max_s": max(ttft),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="default", help="model spec (default: the embedded SmolLM2-135M)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--results", type=Path, help="write the JSON results here")
    args = parser.parse_args(argv)

    from tunesmith.cli.quiet import quiet_libraries
    from tunesmith.serve.adapters import load_model_set
    from tunesmith.serve.app import create_app
    from tunesmith.serve.engine import Engine
    from tunesmith.serve.server import ServerThread

    quiet_libraries(verbose=False)
    torch.set_flush_denormal(True)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    models = load_model_set(args.model, dtype=dtype)
    name = models.base_name
    tokenizer = models.served[name].tokenizer
    model = models.model
    engine = Engine(model, max_context=models.context_length, max_batch=max(args.clients))
    prompt = chat_ids(tokenizer, QUESTIONS[0])
    n = args.new_tokens

    hf_generate(model, tokenizer, [prompt], 4)  # warm-up both paths
    engine_stream(engine, prompt, 4)
    single: dict[str, list[float]] = {"hf_tps": [], "engine_tps": [], "engine_ttft": []}
    same = True
    for _ in range(args.repeats):
        seconds, (hf_tokens,) = hf_generate(model, tokenizer, [prompt], n)
        single["hf_tps"].append(n / seconds)
        seconds, first, engine_tokens = engine_stream(engine, prompt, n)
        single["engine_tps"].append(len(engine_tokens) / seconds)
        single["engine_ttft"].append(first)
        same = same and hf_tokens == engine_tokens

    concurrent: dict[int, dict[str, Any]] = {}
    with ServerThread(create_app(engine, models)) as server:
        http_clients(server.url, name, 1, 4)  # warm-up
        for clients in args.clients:
            prompts = [chat_ids(tokenizer, QUESTIONS[i % len(QUESTIONS)]) for i in range(clients)]
            runs, baseline = [], []
            for _ in range(args.repeats):
                engine.peak_batch = 0
                runs.append(http_clients(server.url, name, clients, n))
                runs[-1]["peak_batch"] = engine.peak_batch
                seconds, _ = hf_generate(model, tokenizer, prompts, n)
                baseline.append(clients * n / seconds)
            concurrent[clients] = {
                key: statistics.median(run[key] for run in runs) for key in runs[0] if key != "peak_batch"
            }
            concurrent[clients]["peak_batch"] = max(run["peak_batch"] for run in runs)
            concurrent[clients]["hf_static_batch_tps"] = statistics.median(baseline)
    engine.close()

    results = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": {"cpu": cpu_name(), "threads": torch.get_num_threads()},
        "model": args.model,
        "dtype": args.dtype,
        "new_tokens": n,
        "repeats": args.repeats,
        "single_stream": {key: statistics.median(values) for key, values in single.items()},
        "single_stream_same_tokens": same,
        "concurrent": concurrent,
    }
    _print_table(results)
    if args.results:
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(json.dumps(results, indent=1))
    return 0


def _print_table(results: dict[str, Any]) -> None:
    single = results["single_stream"]
    print(
        f"\n{results['model']} ({results['dtype']}), {results['new_tokens']} new tokens, medians of {results['repeats']}"
    )
    print("\n| one stream | tokens/s | ratio |")
    print("|---|---|---|")
    print(f"| transformers generate | {single['hf_tps']:.1f} | 1.00 |")
    ratio = single["engine_tps"] / single["hf_tps"]
    print(f"| tunesmith engine | {single['engine_tps']:.1f} | {ratio:.2f} |")
    print(
        f"\nengine time to first token {single['engine_ttft'] * 1000:.0f} ms; same greedy tokens: {results['single_stream_same_tokens']}"
    )
    print(
        "\n| clients | server tokens/s | TTFT median | TTFT max | peak batch | generate, static batch tokens/s |"
    )
    print("|---|---|---|---|---|---|")
    for clients, row in results["concurrent"].items():
        print(
            f"| {clients} | {row['tokens_per_s']:.1f} | {row['ttft_median_s'] * 1000:.0f} ms | "
            f"{row['ttft_max_s'] * 1000:.0f} ms | {row['peak_batch']} | {row['hf_static_batch_tps']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
