"""64 requests over 16 tasks of every kind (Zipf popularity) on SmolLM2, in one run:
  (a) our engine serving them all in one continuous batch,
  (b) the same requests on the plain backbone (the adapter overhead),
  (c) the best transformers + peft can do: one task at a time, batched (padded) within a task,
      all LoRA tasks together through peft's mixed `adapter_names` batching.
Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from adapter_cases import make_peft_adapter, peft_configs
from common import append_results

from prefixserve.adapters_store.peft_import import import_peft
from prefixserve.config import CacheConfig, EngineConfig, ModelConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.models.embedded import prepare_embedded_backbone

KIND_CYCLE = ["prefix", "prefix-projection", "prompt-random", "prompt-text", "ptuning-mlp", "ptuning-lstm",
              "lora-attention", "lora-all-linear"]


def workload(num_requests: int, num_tasks: int, seed: int = 0) -> list[tuple[str, str]]:
    """(task, prompt) pairs; task popularity ~ Zipf(1.1) so a few tasks are hot and many are cold."""
    rng = np.random.default_rng(seed)
    weights = 1.0 / np.arange(1, num_tasks + 1) ** 1.1
    tasks = rng.choice(num_tasks, size=num_requests, p=weights / weights.sum())
    topics = ["a cat", "the sea", "a robot", "mountains", "a library", "the moon", "a baker", "winter"]
    return [(f"task-{t:02d}", f"Tell me about {topics[i % len(topics)]}" + " in detail" * (i % 4))
            for i, t in enumerate(tasks)]


def build_tasks(base, tokenizer_dir: Path, root: Path, num_tasks: int):
    """num_tasks PEFT adapters cycling through every kind; returns name -> (peft config name, folder)."""
    configs = peft_configs(tokenizer_dir)
    tasks = {}
    for i in range(num_tasks):
        kind = KIND_CYCLE[i % len(KIND_CYCLE)]
        folder = root / f"task-{i:02d}"
        make_peft_adapter(base, configs[kind], folder, seed=100 + i)
        tasks[f"task-{i:02d}"] = (kind, folder)
    return tasks


def run_ours(engine: LLMEngine, jobs, params, with_tasks: bool) -> dict:
    start = time.perf_counter()
    engine.generate([p for _, p in jobs], params, tasks=[t for t, _ in jobs] if with_tasks else None)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": len(jobs) * params.max_new_tokens / seconds}


@torch.inference_mode()
def run_peft(base, tokenizer, tasks, jobs, new_tokens: int) -> dict:
    from peft import PeftModel

    tokenizer.padding_side = "left"
    gen = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
               pad_token_id=tokenizer.pad_token_id)
    lora_names = [n for n, (kind, _) in tasks.items() if kind.startswith("lora")]
    # LoRA injects into the base's modules, so all LoRA tasks share one separate copy.
    lora_model = PeftModel.from_pretrained(copy.deepcopy(base), tasks[lora_names[0]][1], adapter_name=lora_names[0])
    for name in lora_names[1:]:
        lora_model.load_adapter(tasks[name][1], adapter_name=name)
    prompt_models = {n: PeftModel.from_pretrained(base, folder) for n, (kind, folder) in tasks.items()
                     if not kind.startswith("lora")}
    start = time.perf_counter()
    for name, model in prompt_models.items():  # one task at a time, batched within the task
        prompts = [p for t, p in jobs if t == name]
        if prompts:
            model.generate(**tokenizer(prompts, return_tensors="pt", padding=True), **gen)
    lora_jobs = [(t, p) for t, p in jobs if t in lora_names]
    if lora_jobs:  # every LoRA request in one mixed batch
        batch = tokenizer([p for _, p in lora_jobs], return_tensors="pt", padding=True)
        lora_model.generate(**batch, adapter_names=[t for t, _ in lora_jobs], **gen)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "tokens_per_s": len(jobs) * new_tokens / seconds}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs; each contender keeps its best")
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = prepare_embedded_backbone(Path(ModelConfig.cache_dir).expanduser())
    base = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    jobs = workload(args.requests, args.tasks)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    with tempfile.TemporaryDirectory() as tmp:
        tasks = build_tasks(base, path, Path(tmp), args.tasks)
        engine = LLMEngine.from_config(EngineConfig(cache=CacheConfig()))
        for name, (_, folder) in tasks.items():
            engine.register_adapter(name, import_peft(folder, arch=engine.backbone.arch,
                                                      fingerprint=engine.adapters.fingerprint,
                                                      limits=engine.config.adapters))
        run_ours(engine, jobs[:4], params, with_tasks=True)  # warm-up
        runs = {"mixed": [], "plain": [], "peft": []}
        for _ in range(args.repeats):
            runs["mixed"].append(run_ours(engine, jobs, params, with_tasks=True))
            runs["plain"].append(run_ours(engine, jobs, params, with_tasks=False))
            runs["peft"].append(run_peft(base, tokenizer, tasks, jobs, args.new_tokens))
    best = {k: max(v, key=lambda r: r["tokens_per_s"]) for k, v in runs.items()}
    result = {
        "benchmark": "mixed_adapters", "model": "SmolLM2-135M-Instruct fp32", "requests": args.requests,
        "tasks": args.tasks, "new_tokens": args.new_tokens, "kinds": sorted(set(KIND_CYCLE)),
        "ours_mixed": best["mixed"], "ours_plain_backbone": best["plain"], "transformers_peft": best["peft"],
        "adapter_overhead_ratio": best["mixed"]["tokens_per_s"] / best["plain"]["tokens_per_s"],
        "speedup_vs_peft": best["mixed"]["tokens_per_s"] / best["peft"]["tokens_per_s"],
        "all_runs_tokens_per_s": {k: [round(r["tokens_per_s"], 1) for r in v] for k, v in runs.items()},
    }
    if not args.no_record:
        append_results("mixed_adapters", [
            f"{args.requests} requests over {args.tasks} tasks (Zipf 1.1; kinds cycle through "
            f"{', '.join(KIND_CYCLE)}), "
            f"{args.new_tokens} new tokens each, SmolLM2-135M-Instruct fp32, greedy; best of {args.repeats} "
            f"alternating runs (all: {result['all_runs_tokens_per_s']}).",
            "",
            "| | output tokens/s | |",
            "|---|---|---|",
            f"| (a) prefixserve, all tasks in one batch | {best['mixed']['tokens_per_s']:.1f} | |",
            f"| (b) prefixserve, same requests on the plain backbone | {best['plain']['tokens_per_s']:.1f} | "
            f"(a)/(b) = {result['adapter_overhead_ratio']:.2f} |",
            f"| (c) transformers + peft, task by task (LoRA mixed) | {best['peft']['tokens_per_s']:.1f} | "
            f"(a)/(c) = {result['speedup_vs_peft']:.2f}x |",
        ])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
