"""What the OpenAI sampling controls cost, on SmolLM2, measured side by side in one run:

- the sampler on a batch of plain rows against the bare argmax it replaced (what rows that use no
  control pay), and against the decode step it sits in;
- each control (penalties, logit_bias, top_logprobs, a JSON-schema grammar) on half the rows of a batch;
- echo's prompt logprobs: a 32 x ~128-token prefill with and without them;
- n = 4 choices against 4 separate requests of the same prompt (one shared prefill vs four).

Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results

from prefixserve.config import EngineConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import Request, SamplingParams
from prefixserve.engine.structured import StructuredOutput

SCHEMA = json.dumps({"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                     "required": ["name", "age"], "additionalProperties": False})
CONTROLS = {
    "penalties": dict(presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2),
    "logit_bias": dict(logit_bias=tuple((t, -5.0) for t in range(100, 120))),
    "top_logprobs_5": dict(logprobs=True, top_logprobs=5),
    "json_schema": dict(structured=StructuredOutput("json_schema", SCHEMA)),
}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def rows(engine: LLMEngine, batch: int, controlled: int, control: dict) -> list[Request]:
    """`batch` requests 40 tokens into their output; the first `controlled` use `control`."""
    out = []
    for i in range(batch):
        params = SamplingParams(temperature=0, **(control if i < controlled else {}))
        request = engine.make_request(prompt_token_ids=list(range(200 + i, 240 + i)), params=params)
        request.token_ids += [300 + (i * 7 + j) % 50 for j in range(40)]
        out.append(request)
    return out


def bench_sampler(engine: LLMEngine, batch: int, repeats: int) -> dict:
    vocab = engine.backbone.arch.vocab_size
    logits = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(0))
    plain = rows(engine, batch, 0, {})
    result = {
        "argmax_us": median_time(lambda: logits.argmax(-1).tolist(), repeats) * 1e6,
        "sampler_plain_us": median_time(lambda: engine.sampler(logits, plain), repeats) * 1e6,
    }
    for name, control in CONTROLS.items():
        if name == "json_schema":  # a matcher advances per token: fresh rows each time, their setup excluded
            def once(control=control):
                batch_rows = rows(engine, batch, batch // 2, control)
                start = time.perf_counter()
                engine.sampler(logits, batch_rows)
                return time.perf_counter() - start
            seconds = statistics.median(once() for _ in range(repeats))
        else:
            mixed = rows(engine, batch, batch // 2, control)
            seconds = median_time(lambda mixed=mixed: engine.sampler(logits, mixed), repeats)
        result[f"sampler_half_{name}_us"] = seconds * 1e6
    return result


def bench_decode_step(engine: LLMEngine, batch: int) -> float:
    """Median decode step with `batch` plain requests running (seconds)."""
    params = SamplingParams(max_new_tokens=24, temperature=0, ignore_eos=True)
    for i in range(batch):
        engine.add_request(prompt_token_ids=list(range(200 + i, 232 + i)), params=params)
    times = []
    while engine.has_unfinished():
        decoding = not engine.scheduler.waiting and all(
            r.num_computed_tokens >= r.num_prompt_tokens for r in engine.scheduler.running)
        start = time.perf_counter()
        engine.step()
        if decoding:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_prefill(engine: LLMEngine, batch: int, prompt_len: int, prompt_logprobs: int | None) -> float:
    params = SamplingParams(max_new_tokens=1, temperature=0, ignore_eos=True, prompt_logprobs=prompt_logprobs)
    start = time.perf_counter()
    for i in range(batch):
        engine.add_request(prompt_token_ids=[(200 + i * 13 + j) % 40000 for j in range(prompt_len)], params=params)
    while engine.has_unfinished():
        engine.step()
    return time.perf_counter() - start


def bench_choices(engine: LLMEngine, prompt_len: int, n: int, new_tokens: int) -> dict:
    prompt = [(500 + j * 3) % 40000 for j in range(prompt_len)]
    counted = {"tokens": 0}
    execute = engine.runner.execute

    def counting(step):
        counted["tokens"] += step.num_batched_tokens
        return execute(step)

    engine.runner.execute = counting
    out = {}
    try:
        for name, requests in (("n_choices", [SamplingParams(n=n, max_new_tokens=new_tokens, temperature=1.0,
                                                             seed=1, ignore_eos=True)]),
                               ("separate_requests", [SamplingParams(max_new_tokens=new_tokens, temperature=1.0,
                                                                     seed=1 + i, ignore_eos=True) for i in range(n)])):
            counted["tokens"] = 0
            start = time.perf_counter()
            for params in requests:
                engine.add_request(prompt_token_ids=prompt, params=params)
            while engine.has_unfinished():
                engine.step()
            out[name] = {"seconds": time.perf_counter() - start, "tokens_computed": counted["tokens"]}
    finally:
        engine.runner.execute = execute
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    engine = LLMEngine.from_config(EngineConfig())
    engine.generate(["warm up"], SamplingParams(max_new_tokens=2, temperature=0))
    sampler = bench_sampler(engine, args.batch, args.repeats)
    step_s = bench_decode_step(engine, args.batch)
    prefill = {}
    for _ in range(2):  # alternate, keep each one's best: the machine drifts within minutes
        for name, k in (("plain", None), ("prompt_logprobs_0", 0), ("prompt_logprobs_5", 5)):
            seconds = bench_prefill(engine, args.batch, args.prompt_len, k)
            prefill[name] = min(prefill.get(name, float("inf")), seconds)
    choices = bench_choices(engine, args.prompt_len, 4, 16)
    result = {
        "benchmark": "sampling_controls", "model": "SmolLM2-135M-Instruct fp32", "batch": args.batch,
        "sampler": sampler, "decode_step_ms": step_s * 1e3,
        "plain_rows_overhead_vs_argmax_of_step": (sampler["sampler_plain_us"] - sampler["argmax_us"]) / 1e6 / step_s,
        "half_rows_controlled_of_step": {name: sampler[f"sampler_half_{name}_us"] / 1e6 / step_s for name in CONTROLS},
        "prefill_s": prefill,
        "prompt_logprobs_prefill_ratio": {k: v / prefill["plain"] for k, v in prefill.items() if k != "plain"},
        "choices_n4": choices,
        "n4_speedup_vs_separate": choices["separate_requests"]["seconds"] / choices["n_choices"]["seconds"],
    }
    if not args.no_record:
        s = result["sampler"]
        lines = [
            f"Batch {args.batch}, decode step {step_s * 1e3:.1f} ms (median). Sampler on all-plain rows "
            f"{s['sampler_plain_us']:.0f} us vs the bare argmax {s['argmax_us']:.0f} us: "
            f"{result['plain_rows_overhead_vs_argmax_of_step'] * 100:.2f} % of a step.",
            "Sampler with half the rows controlled (us, and share of a decode step): " + ", ".join(
                f"{n} {s[f'sampler_half_{n}_us']:.0f} ({result['half_rows_controlled_of_step'][n] * 100:.1f} %)"
                for n in CONTROLS) + ".",
            f"Prefill of {args.batch} x {args.prompt_len} tokens with prompt logprobs / without: " + ", ".join(
                f"{k} {v:.2f}x" for k, v in result["prompt_logprobs_prefill_ratio"].items()) + ".",
            f"n=4 choices of one {args.prompt_len}-token prompt (16 new tokens) vs 4 separate requests: "
            f"{choices['n_choices']['tokens_computed']} vs {choices['separate_requests']['tokens_computed']} tokens "
            f"computed, {result['n4_speedup_vs_separate']:.2f}x faster.",
        ]
        append_results("Sampling controls (penalties, logit_bias, logprobs, grammars, echo, n)", lines)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
