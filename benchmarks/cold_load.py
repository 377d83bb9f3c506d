"""Time from upload to the first token of the first request of a new task, per kind (prefix,
prompt, intrinsic, lora), with LocalStore and RedisStore, on SmolLM2 on this CPU. Two paths:
"same replica" (the serving engine takes the upload) and "other client" (another store client
uploads; the engine learns of the task from the store and fetches, validates and compiles it).
Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from common import append_results

from prefixserve.adapters_store.format import artifact_version, encode_artifact
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.adapters_store.redis_store import RedisStore
from prefixserve.config import EngineConfig
from prefixserve.engine.llm_engine import LLMEngine
from prefixserve.engine.request import SamplingParams

NUM_VIRTUAL_TOKENS = 16
FIRST_TOKEN = SamplingParams(max_new_tokens=1, temperature=0)


class ArtifactFactory:
    """Fresh random artifacts (so every trial is a new version) for the engine's backbone."""

    def __init__(self, engine: LLMEngine, seed: int = 0):
        self.arch, self.fingerprint = engine.backbone.arch, engine.adapters.fingerprint
        self.gen = torch.Generator().manual_seed(seed)
        a = self.arch
        d, hidden_dec = 8, 64
        decoder = {"decoder.0.weight": self._randn(hidden_dec, d), "decoder.0.bias": self._randn(hidden_dec),
                   "decoder.2.weight": self._randn(NUM_VIRTUAL_TOKENS * a.hidden_size, hidden_dec),
                   "decoder.2.bias": self._randn(NUM_VIRTUAL_TOKENS * a.hidden_size)}
        self.subspace = encode_artifact("subspace", {"intrinsic_dim": d, "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
                                                     "decoder_hidden": hidden_dec}, decoder, self.fingerprint)

    def _randn(self, *shape) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * 0.05

    def make(self, kind: str) -> bytes:
        a = self.arch
        if kind == "prefix":
            shape = (a.num_layers, NUM_VIRTUAL_TOKENS, a.num_kv_heads, a.head_dim)
            return encode_artifact(kind, {"num_virtual_tokens": NUM_VIRTUAL_TOKENS},
                                   {"keys": self._randn(*shape), "values": self._randn(*shape)}, self.fingerprint)
        if kind == "prompt":
            return encode_artifact(kind, {"num_virtual_tokens": NUM_VIRTUAL_TOKENS},
                                   {"embeddings": self._randn(NUM_VIRTUAL_TOKENS, a.hidden_size)}, self.fingerprint)
        if kind == "intrinsic":
            return encode_artifact(kind, {"subspace_version": artifact_version(self.subspace)},
                                   {"z": self._randn(8)}, self.fingerprint)
        rank, q_out, kv_out = 8, a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        tensors = {}
        for i in range(a.num_layers):
            tensors[f"layers.{i}.q_proj.lora_a"] = self._randn(rank, a.hidden_size)
            tensors[f"layers.{i}.q_proj.lora_b"] = self._randn(q_out, rank)
            tensors[f"layers.{i}.v_proj.lora_a"] = self._randn(rank, a.hidden_size)
            tensors[f"layers.{i}.v_proj.lora_b"] = self._randn(kv_out, rank)
        return encode_artifact(kind, {"rank": rank, "alpha": 16.0, "use_rslora": False,
                                      "targets": ["q_proj", "v_proj"]}, tensors, self.fingerprint)


def first_token_ms(engine: LLMEngine, upload, task: str) -> float:
    start = time.perf_counter()
    upload()
    request = engine.add_request("Hello, how are you?", FIRST_TOKEN, task=task)
    while request.num_output_tokens == 0:
        engine.step()
    return (time.perf_counter() - start) * 1e3


def run(engine: LLMEngine, uploader, factory: ArtifactFactory, trials: int, label: str) -> dict:
    results = {}
    engine.register_adapter(f"{label}-subspace", factory.subspace)
    plain = []
    for kind in ("prefix", "prompt", "intrinsic", "lora"):
        same, other = [], []
        for t in range(trials):
            # The same first token without any adapter: the floor every cold load sits on.
            plain.append(first_token_ms(engine, lambda: None, None))
            same_task, other_task = f"{label}-{kind}-same-{t}", f"{label}-{kind}-other-{t}"
            upload = partial(engine.register_adapter, same_task, factory.make(kind))
            same.append(first_token_ms(engine, upload, same_task))
            upload = partial(uploader.put, other_task, factory.make(kind), kind)
            other.append(first_token_ms(engine, upload, other_task))
            for name in (same_task, other_task):
                engine.unregister_adapter(name)  # keep slots and pages free for the next trial
        results[kind] = {"same_replica_p50_ms": statistics.median(same),
                         "same_replica_p90_ms": sorted(same)[int(0.9 * (len(same) - 1))],
                         "other_client_p50_ms": statistics.median(other),
                         "other_client_p90_ms": sorted(other)[int(0.9 * (len(other) - 1))]}
    results["plain_first_token_p50_ms"] = statistics.median(plain)
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--no-record", action="store_true")
    args = parser.parse_args()
    from redis_server import redis_url_from_env_or_start

    out = {"benchmark": "cold_load", "model": "SmolLM2-135M-Instruct fp32", "num_virtual_tokens": NUM_VIRTUAL_TOKENS}
    with tempfile.TemporaryDirectory() as tmp:
        local = LocalStore(Path(tmp) / "store")
        engine = LLMEngine.from_config(EngineConfig(), local)
        factory = ArtifactFactory(engine)
        engine.generate(["warm up"], FIRST_TOKEN)
        out["local_store"] = run(engine, LocalStore(Path(tmp) / "store"), factory, args.trials, "local")
        engine.close()
        url, server = redis_url_from_env_or_start(Path(tmp) / "redis")  # REDIS_URL, or a private redis-server
        try:
            namespace = f"bench-cold-load-{os.getpid()}"
            engine = LLMEngine.from_config(EngineConfig(), RedisStore(url, namespace=namespace))
            engine.generate(["warm up"], FIRST_TOKEN)
            out["redis_store"] = run(engine, RedisStore(url, namespace=namespace), factory, args.trials, "redis")
            engine.close()
        finally:
            if server is not None:
                server.stop()
    if not args.no_record:
        lines = [f"Upload to first token of a new task's first request, {NUM_VIRTUAL_TOKENS}-token prompt-style "
                 f"tasks, LoRA rank 8 on q/v; {args.trials} trials each; ms (p50 / p90).", "",
                 "| store | kind | same replica | other client |", "|---|---|---|---|"]
        for store in ("local_store", "redis_store"):
            for kind, r in out[store].items():
                if kind == "plain_first_token_p50_ms":
                    lines.append(f"| {store} | no adapter (first token only) | {r:.1f} | |")
                    continue
                lines.append(f"| {store} | {kind} | {r['same_replica_p50_ms']:.1f} / {r['same_replica_p90_ms']:.1f} | "
                             f"{r['other_client_p50_ms']:.1f} / {r['other_client_p90_ms']:.1f} |")
        append_results("cold_load", lines)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
