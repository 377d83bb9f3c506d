"""32 requests x 64 new tokens on SmolLM2: our engine vs transformers generate one request at a
time and batched with padding, plus the machine's floor (the backbone's weight matmuls alone at
the same batch size). Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, layer_weights, matmul_seconds

from prefixserve.config import EngineConfig, ModelConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.models.embedded import prepare_embedded_backbone

TOPICS = ["a cat", "the sea", "a robot", "mountains", "a library", "the moon", "a baker", "winter"]


def prompts(n: int) -> list[str]:
    # Lengths vary (5 to ~40 tokens) as real traffic does; padding costs the batched baseline for it.
    return [f"Write a story about {TOPICS[i % len(TOPICS)]}" + ", and then what happened next" * (i % 6)
            for i in range(n)]


def bench_ours(engine: LLMEngine, texts: list[str], new_tokens: int) -> dict:
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0, ignore_eos=True)
    engine.generate(texts[:2], SamplingParams(max_new_tokens=2, temperature=0))  # warm-up
    start = time.perf_counter()
    for t in texts:
        engine.add_request(t, params)
    decode_steps, decode_time = 0, 0.0
    while engine.has_unfinished():
        step_start = time.perf_counter()
        prefilling = any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running)
        prefilling |= bool(engine.scheduler.waiting)
        engine.step()
        if not prefilling and len(engine.scheduler.running) == len(texts):
            decode_steps += 1
            decode_time += time.perf_counter() - step_start
    total = time.perf_counter() - start
    return {"seconds": total, "tokens_per_s": len(texts) * new_tokens / total,
            "decode_tokens_per_s_at_full_batch": len(texts) * decode_steps / decode_time if decode_steps else None}


@torch.inference_mode()
def bench_hf_one_at_a_time(model, tokenizer, texts: list[str], new_tokens: int) -> dict:
    start = time.perf_counter()
    for t in texts:
        ids = tokenizer(t, return_tensors="pt")
        model.generate(**ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                       pad_token_id=tokenizer.pad_token_id)
    total = time.perf_counter() - start
    return {"seconds": total, "tokens_per_s": len(texts) * new_tokens / total, "requests": len(texts)}


@torch.inference_mode()
def bench_hf_padded(model, tokenizer, texts: list[str], new_tokens: int) -> dict:
    tokenizer.padding_side = "left"
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=tokenizer.pad_token_id)
    total = time.perf_counter() - start
    return {"seconds": total, "tokens_per_s": len(texts) * new_tokens / total}


@torch.inference_mode()
def bench_floor(engine: LLMEngine, batch: int, iters: int = 20) -> dict:
    """Every weight matmul of one decode step (incl. the LM head) at this batch size, nothing else."""
    model = engine.backbone.model
    step = matmul_seconds([*layer_weights(model), model.lm_head.weight], batch, iters, warmup=3)
    return {"step_ms": step * 1e3, "tokens_per_s": batch / step}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--one-at-a-time-requests", type=int, default=None,
                        help="time the one-at-a-time baseline on fewer requests (its tokens/s is per request)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="alternate ours / padded batch this many times and keep each one's best run: "
                             "a shared 2-core VM drifts by tens of percent within a minute")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_embedded_backbone(Path(ModelConfig.cache_dir).expanduser())
    engine = LLMEngine.from_config(EngineConfig())
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    texts = prompts(args.requests)
    runs: dict[str, list[dict]] = {"ours": [], "padded": [], "floor": []}
    for _ in range(args.repeats):
        runs["ours"].append(bench_ours(engine, texts, args.new_tokens))
        runs["floor"].append(bench_floor(engine, args.requests))
        runs["padded"].append(bench_hf_padded(model, tokenizer, texts, args.new_tokens))
    best = {name: max(r, key=lambda x: x["tokens_per_s"]) for name, r in runs.items()}
    ours, padded, floor = best["ours"], best["padded"], best["floor"]
    single = bench_hf_one_at_a_time(model, tokenizer, texts[:args.one_at_a_time_requests or args.requests],
                                    args.new_tokens)
    decode = ours["decode_tokens_per_s_at_full_batch"]
    result = {
        "benchmark": "engine_throughput", "model": "SmolLM2-135M-Instruct fp32",
        "requests": args.requests, "new_tokens": args.new_tokens,
        "ours": ours, "hf_one_at_a_time": single, "hf_padded_batch": padded, "matmul_floor": floor,
        "repeats": args.repeats,
        "all_runs_tokens_per_s": {name: [round(x["tokens_per_s"], 1) for x in r] for name, r in runs.items()},
        "speedup_vs_one_at_a_time": ours["tokens_per_s"] / single["tokens_per_s"],
        "speedup_vs_padded_batch": ours["tokens_per_s"] / padded["tokens_per_s"],
        "decode_fraction_of_floor": decode / floor["tokens_per_s"] if decode else None,
    }
    if not args.no_record:
        append_results("engine_throughput", [
            f"{args.requests} requests x {args.new_tokens} new tokens, SmolLM2-135M-Instruct fp32, greedy. Best of "
            f"{args.repeats} alternating runs for ours, padded batch and floor (all runs: "
            f"{result['all_runs_tokens_per_s']}); one-at-a-time measured once.",
            "",
            "| | output tokens/s | ratio |",
            "|---|---|---|",
            f"| prefixserve engine | {ours['tokens_per_s']:.1f} | 1 |",
            f"| transformers one at a time | {single['tokens_per_s']:.1f} | "
            f"{result['speedup_vs_one_at_a_time']:.2f}x slower |",
            f"| transformers padded batch | {padded['tokens_per_s']:.1f} | "
            f"{result['speedup_vs_padded_batch']:.2f}x slower |",
            f"| matmul floor (weights only, batch {args.requests}) | {floor['tokens_per_s']:.1f} | |",
            "",
            f"Decode at full batch: {decode:.1f} tokens/s = {result['decode_fraction_of_floor']:.0%} of the floor.",
        ])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
