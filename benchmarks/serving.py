"""The realistic serving workload: REQUESTS streaming completions of ISL prompt tokens and exactly OSL
output tokens, CONCURRENCY in flight, plain backbone, through real HTTP (`prefixserve serve` as its own
process) — against, in the same run:

- transformers' `generate` on the same prompts in static batches of CONCURRENCY (what a user could
  script in ten lines; the prompts have one length, so the batches carry no padding), and
- the machine's matmul floor for the same token counts: the layers' weight matmuls over the prefill
  tokens at the server's chunk size (the LM head once per prompt), plus every weight matmul over the
  decode tokens at batch CONCURRENCY — no attention, no sampling, no Python. floor tok/s = output
  tokens / that time.

With --prefill-caps, one server per --max-prefill-tokens-with-decodes value (the ITL/TTFT trade).
Servers, transformers and floor runs alternate --repeats times and each keeps its best, since a shared
2-core VM drifts by tens of percent within minutes. tok_s: output tokens over the wall clock from the
first send to the last token; TTFT: send to first token; ITL: gaps between a stream's tokens.
With --profile, the same workload also runs in-process through LLMEngine under cProfile and the
top functions by own time are printed and recorded (what the engine thread spends its time on,
without HTTP). Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, free_port, layer_weights, machine, matmul_seconds, start_server
from many_tasks import run_requests

from prefixserve.config import EngineConfig, ModelConfig, SchedulerConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams
from prefixserve.engine.task_pointers import BASE_TASK
from prefixserve.models.embedded import prepare_embedded_backbone


def make_prompts(num: int, isl: int, vocab_size: int, seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(1000, vocab_size, (isl,), generator=gen).tolist() for _ in range(num)]


@torch.inference_mode()
def bench_hf_static(model, prompts: list[list[int]], osl: int, batch: int) -> dict:
    """transformers generate over the prompts in consecutive static batches (greedy, exactly osl tokens)."""
    start = time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch])
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=osl,
                       min_new_tokens=osl, do_sample=False, pad_token_id=0)
    seconds = time.perf_counter() - start
    return {"tok_s": round(len(prompts) * osl / seconds, 1), "wall_s": round(seconds, 2)}


@torch.inference_mode()
def bench_floor(backbone, num_requests: int, isl: int, osl: int, batch: int, chunk: int, iters: int = 5) -> dict:
    """Weight matmuls alone for the workload's token counts: the layers' projections over the prefill
    rows in chunks of `chunk` and the LM head once per prompt (only its last row is sampled), then
    every matmul incl. the LM head over the decode rows, `batch` at a time."""
    model = backbone.model
    layers, lm_head = layer_weights(model), [model.lm_head.weight]
    prefill_s = (matmul_seconds(layers, chunk, iters) * num_requests * isl / chunk
                 + matmul_seconds(lm_head, batch, iters) * num_requests / batch)
    decode_s = matmul_seconds(layers + lm_head, batch, iters) * num_requests * osl / batch
    total = prefill_s + decode_s
    return {"tok_s": round(num_requests * osl / total, 1), "prefill_s": round(prefill_s, 2),
            "decode_s": round(decode_s, 2), "decode_only_tok_s": round(num_requests * osl / decode_s, 1)}


def profile_engine(prompts: list[list[int]], osl: int, concurrency: int, top: int = 20) -> list[str]:
    """The workload in-process through LLMEngine under cProfile; the top functions by own time."""
    engine = LLMEngine.from_config(EngineConfig(scheduler=SchedulerConfig(max_num_seqs=concurrency)))
    params = SamplingParams(max_new_tokens=osl, temperature=0, ignore_eos=True)
    engine.generate(prompts[:2], SamplingParams(max_new_tokens=2, temperature=0))  # warm-up
    profiler = cProfile.Profile()
    start = time.perf_counter()
    profiler.enable()
    for p in prompts:
        engine.add_request(prompt_token_ids=p, params=params)
    while engine.has_unfinished():
        engine.step()
    profiler.disable()
    seconds = time.perf_counter() - start
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(top)
    lines = [line.rstrip() for line in out.getvalue().splitlines()]
    first = next(i for i, line in enumerate(lines) if line.lstrip().startswith("ncalls"))
    header = f"in-process: {len(prompts) * osl / seconds:.1f} output tok/s, {seconds:.1f} s under cProfile"
    return [header, *lines[first:first + top + 1]]


def server_row(name: str, run: dict, floor: dict, hf: dict | None) -> str:
    vs_hf = f"{run['tok_s'] / hf['tok_s']:.2f}" if hf else "-"
    return (f"| {name} | {run['tok_s']} | {run['tok_s'] / floor['tok_s']:.2f} | {vs_hf} | {run['ttft_p50_s']} / "
            f"{run['ttft_p99_s']} s | {run['itl_p50_ms']} / {run['itl_p99_ms']} ms "
            f"({run['itl_p99_ms'] / run['itl_p50_ms']:.1f}x) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight; transformers' batch size")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--prefill-caps", default="0,128",
                        help="comma list of --max-prefill-tokens-with-decodes values, one server each (0 = no cap)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="also profile the engine in-process (cProfile)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM

    from prefixserve.models.loader import load_backbone

    caps = [int(c) for c in args.prefill_caps.split(",")]
    chunk = SchedulerConfig().max_num_batched_tokens  # the floor prefills in the largest chunks a step allows
    backbone = load_backbone(ModelConfig())
    prompts = make_prompts(args.requests, args.isl, backbone.arch.vocab_size)
    hf = None
    if not args.no_hf:
        path = prepare_embedded_backbone(Path(ModelConfig.cache_dir).expanduser())
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    names = [f"server_cap{c}" for c in caps]
    runs: dict[str, list[dict]] = {**{name: [] for name in names}, "hf_static": [], "floor": []}
    servers = {}
    with tempfile.TemporaryDirectory(prefix="serving-") as store_dir:
        try:
            for name, cap in zip(names, caps):  # idle servers wait on their queues and take no CPU
                port = free_port()
                servers[name] = (start_server(port, f"{store_dir}/{name}", [
                    "--max-num-seqs", str(args.concurrency), "--device", args.device,
                    "--max-prefill-tokens-with-decodes", str(cap)]), f"http://127.0.0.1:{port}")
                warm = prompts[:8]
                asyncio.run(run_requests(servers[name][1], [BASE_TASK] * len(warm), warm, 4, args.concurrency))
            for _ in range(args.repeats):  # alternating, so drift hits every side alike
                for name in names:
                    runs[name].append(asyncio.run(run_requests(servers[name][1], [BASE_TASK] * len(prompts), prompts,
                                                               args.osl, args.concurrency)))
                    print(f"{name}: {json.dumps(runs[name][-1])}", file=sys.stderr)
                if hf is not None:
                    runs["hf_static"].append(bench_hf_static(hf, prompts, args.osl, args.concurrency))
                    print(f"hf_static: {json.dumps(runs['hf_static'][-1])}", file=sys.stderr)
                runs["floor"].append(bench_floor(backbone, args.requests, args.isl, args.osl, args.concurrency,
                                                 chunk))
                print(f"floor: {json.dumps(runs['floor'][-1])}", file=sys.stderr)
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait(30)
    best = {name: max(r, key=lambda x: x["tok_s"]) for name, r in runs.items() if r}
    floor, hf_best = best["floor"], best.get("hf_static")
    result = {
        "benchmark": "serving", "model": "SmolLM2-135M-Instruct fp32", "device": args.device, "machine": machine(),
        "requests": args.requests, "isl": args.isl, "osl": args.osl, "concurrency": args.concurrency,
        "repeats": args.repeats, "floor_prefill_chunk": chunk, "floor": floor, "hf_static": hf_best,
        "servers": {name: {**best[name], "fraction_of_floor": round(best[name]["tok_s"] / floor["tok_s"], 3),
                           "vs_hf_static": round(best[name]["tok_s"] / hf_best["tok_s"], 3) if hf_best else None,
                           "itl_p99_over_p50": round(best[name]["itl_p99_ms"] / best[name]["itl_p50_ms"], 2)}
                    for name in names},
        "all_tok_s": {name: [x["tok_s"] for x in r] for name, r in runs.items()},
    }
    profile = profile_engine(prompts, args.osl, args.concurrency) if args.profile else []
    if profile:
        print("\n".join(profile), file=sys.stderr)
    if not args.no_record:
        append_results("serving", [
            f"{args.requests} streaming /v1/completions (ISL {args.isl} random ids, OSL {args.osl}, ignore_eos), "
            f"{args.concurrency} in flight, plain backbone, SmolLM2 fp32 on {args.device}; best of {args.repeats} "
            f"alternating runs (all: {result['all_tok_s']}). capN: --max-prefill-tokens-with-decodes N (0 = no cap).",
            "",
            "| | output tok/s | of floor | vs transformers | TTFT p50 / p99 | ITL p50 / p99 |",
            "|---|---|---|---|---|---|",
            *(server_row(f"prefixserve over HTTP, {name.removeprefix('server_')}", best[name], floor, hf_best)
              for name in names),
            *([f"| transformers generate, static batches of {args.concurrency} | {hf_best['tok_s']} | "
               f"{hf_best['tok_s'] / floor['tok_s']:.2f} | 1 | | |"] if hf_best else []),
            f"| matmul floor (prefill chunks of {chunk}, decode batch {args.concurrency}) | {floor['tok_s']} | 1 | | "
            f"| |",
            *(["", "Top of the engine profile (in-process, default config, cProfile by own time):", "", "```",
               *profile, "```"] if profile else []),
            "", "```json", json.dumps(result), "```"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
