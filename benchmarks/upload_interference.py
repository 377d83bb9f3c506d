"""Do uploads slow the other tenants' tokens? Inter-token latency (ITL) of 32 running streams while 20
LoRA uploads of ~20 MB each arrive over HTTP, against the same streams without uploads, side by side
in one run (alternating rounds, so drift hits both alike). Target: ITL p99 with uploads <= 1.5x.

The server runs as its own process (`prefixserve serve` on SmolLM2, a local store in a temporary
directory), as in production; this script is the client: 32 streaming /v1/completions requests of
ISL random token ids and OSL tokens each (ignore_eos), and once every stream has its first token
(prefill is over), the uploads, one after another, each a fresh rank-16 LoRA on all seven
projections of every layer (float32, 19.5 MB). Gaps between consecutive streamed tokens are the ITL
samples; those of the upload rounds are counted only while an upload was in flight, and the
baseline rounds over the same stretch of their decode (the same number of seconds after the first
tokens). Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import append_results, free_port, percentile, start_server, stream

from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import encode_artifact
from prefixserve.adapters_store.kinds import LORA_TARGETS, lora_features
from prefixserve.config import ModelConfig
from prefixserve.models.loader import load_backbone

LORA_RANK = 16


class LoraFactory:
    """Fresh rank-16 LoRAs on every projection of SmolLM2 (every upload is a new version)."""

    def __init__(self, seed: int = 0):
        backbone = load_backbone(ModelConfig())
        self.arch, self.fingerprint = backbone.arch, backbone_fingerprint(backbone)
        self.vocab_size = backbone.arch.vocab_size
        self.gen = torch.Generator().manual_seed(seed)

    def make(self) -> bytes:
        tensors = {}
        features = lora_features(self.arch)
        for layer in range(self.arch.num_layers):
            for target in LORA_TARGETS:
                fan_in, fan_out = features[target]
                tensors[f"layers.{layer}.{target}.lora_a"] = torch.randn(LORA_RANK, fan_in, generator=self.gen) * 0.01
                tensors[f"layers.{layer}.{target}.lora_b"] = torch.randn(fan_out, LORA_RANK, generator=self.gen) * 0.01
        return encode_artifact("lora", {"rank": LORA_RANK, "alpha": 16.0, "use_rslora": False,
                                        "targets": sorted(LORA_TARGETS)}, tensors, self.fingerprint)


async def upload_all(client: httpx.AsyncClient, artifacts: list[bytes], round_index: int) -> list[tuple[float, float]]:
    spans = []
    for i, data in enumerate(artifacts):
        start = time.monotonic()
        r = await client.put(f"/v1/tasks/lora-{round_index}-{i}", files={"file": ("adapter.safetensors", data)})
        if r.status_code != 201:
            raise RuntimeError(f"upload refused: {r.status_code} {r.text[:200]}")
        spans.append((start, time.monotonic()))
    return spans


async def one_round(base_url: str, args, prompts: list[list[int]], artifacts: list[bytes] | None,
                    round_index: int) -> dict:
    """Run the streams (and the uploads, if given); return the ITL gaps inside the measured window."""
    stamps = [[] for _ in prompts]
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        streams = [asyncio.create_task(stream(client, p, args.osl, s)) for p, s in zip(prompts, stamps)]
        while not all(stamps) and not any(t.done() for t in streams):
            await asyncio.sleep(0.01)
        decode_start = time.monotonic()
        spans = await upload_all(client, artifacts, round_index) if artifacts else []
        await asyncio.gather(*streams)
    decode_end = max(s[-1] for s in stamps)
    window = (spans[0][0], spans[-1][1]) if spans else (decode_start, decode_start + args.window_s)
    gaps = [(b - a) * 1e3 for s in stamps for a, b in zip(s, s[1:]) if window[0] <= b <= window[1]]
    return {"gaps_ms": gaps, "window_s": window[1] - window[0], "decode_s": decode_end - decode_start,
            "uploads_within_decode": sum(end <= decode_end for _, end in spans),
            "upload_s": [e - s for s, e in spans]}


def summary(gaps: list[float]) -> dict:
    return {"samples": len(gaps), "itl_p50_ms": round(percentile(gaps, 0.5), 1),
            "itl_p99_ms": round(percentile(gaps, 0.99), 1), "itl_mean_ms": round(statistics.fmean(gaps), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=128)
    parser.add_argument("--uploads", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3, help="baseline/upload pairs, alternating")
    parser.add_argument("--window-s", type=float, default=None,
                        help="baseline window after the first tokens (default: the upload rounds' mean)")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()

    factory = LoraFactory()
    warm = factory.make()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1000, factory.vocab_size, (args.isl,), generator=gen).tolist()
               for _ in range(args.streams)]
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="upload-interference-") as tmp:
        server = start_server(port, os.path.join(tmp, "store"), ["--max-num-seqs", str(args.streams),
                                                                    "--max-lora-rank", str(LORA_RANK)])
        base_url = f"http://127.0.0.1:{port}"
        try:
            # Warm-up: the first request's costs and the first LoRA's slot stacks (allocated once) stay out.
            asyncio.run(one_round(base_url, argparse.Namespace(**{**vars(args), "osl": 4, "window_s": 1}),
                                  prompts, [warm], -1))
            with_uploads, baseline = [], []
            for r in range(args.rounds):
                artifacts = [factory.make() for _ in range(args.uploads)]
                mb = len(artifacts[0]) / 1e6
                with_uploads.append(asyncio.run(one_round(base_url, args, prompts, artifacts, r)))
                del artifacts
                window = args.window_s or statistics.fmean(u["window_s"] for u in with_uploads)
                baseline.append(asyncio.run(one_round(
                    base_url, argparse.Namespace(**{**vars(args), "window_s": window}), prompts, None, r)))
        finally:
            server.terminate()
            server.wait(30)

    up = summary([g for u in with_uploads for g in u["gaps_ms"]])
    base = summary([g for b in baseline for g in b["gaps_ms"]])
    result = {
        "benchmark": "upload_interference", "streams": args.streams, "isl": args.isl, "osl": args.osl,
        "uploads_per_round": args.uploads, "upload_mb": round(mb, 1), "rounds": args.rounds,
        "baseline": base, "with_uploads": up,
        "p50_ratio": round(up["itl_p50_ms"] / base["itl_p50_ms"], 2),
        "p99_ratio": round(up["itl_p99_ms"] / base["itl_p99_ms"], 2),
        "upload_s_median": round(statistics.median(s for u in with_uploads for s in u["upload_s"]), 2),
        "uploads_within_decode": [u["uploads_within_decode"] for u in with_uploads],
        "upload_window_s": [round(u["window_s"], 1) for u in with_uploads],
        "decode_s": [round(u["decode_s"], 1) for u in with_uploads + baseline],
        "target_p99_ratio": 1.5,
    }
    if not args.no_record:
        append_results("upload_interference", [
            f"{args.streams} streams (ISL {args.isl}, OSL {args.osl}) on SmolLM2 fp32, server in its own process, "
            f"{args.uploads} LoRA uploads of {mb:.1f} MB per round, {args.rounds} rounds each way, alternating.",
            "",
            "| | ITL p50 ms | ITL p99 ms | samples |",
            "|---|---|---|---|",
            f"| streams alone | {base['itl_p50_ms']} | {base['itl_p99_ms']} | {base['samples']} |",
            f"| while uploads arrive | {up['itl_p50_ms']} | {up['itl_p99_ms']} | {up['samples']} |",
            "",
            f"p50 ratio {result['p50_ratio']}, p99 ratio {result['p99_ratio']} (target <= 1.5); median upload "
            f"{result['upload_s_median']} s; uploads finished inside the decode: {result['uploads_within_decode']}.",
            "", "```json", json.dumps(result), "```"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
