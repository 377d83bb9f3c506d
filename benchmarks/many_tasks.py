"""Does throughput hold as a workload spreads over N distinct tasks? Output tokens/s of a stream of
requests over N tasks of one kind, through real HTTP, divided by the same requests on the plain
backbone in the same server right after, per kind and N; with TTFT, ITL and the adapter loads.

The server runs as its own process (`prefixserve serve --max-lora-rank 64` on SmolLM2, a local store
in a temporary directory), restarted for every kind so no cache carries over. Before it starts, every
task of the kind is written straight into its store (LocalStore.put, under the default tenant's
names), so setup is not timed; the server learns each task at its first request and loads it cold
from the store. Kinds: lora8 / lora64 (rank 8 / 64, alpha 16, on q,k,v,o of every layer), prefix,
prompt (16 virtual tokens), ptuning (stored as a prompt, as PEFT saves it: the prompt encoder's
output, converted by import_peft), intrinsic (z over one shared random IPT subspace, 16 virtual
tokens), ia3 (scales on k, v and down_proj's input, peft's default for Llama), bitfit (biases on all
seven projections), adapter (bottleneck adapters of size 16 after attention and the MLP of every
layer, Houlsby's placement, ReLU), mixed (tasks cycle through lora8, prefix, prompt, intrinsic, ia3,
bitfit, adapter), mixed3 (lora8, prefix, prompt: the three kinds of the LoRA-at-scale issue's "1/3 each").
Weights are random and small; every task is distinct. Before measuring, one task
of each kind must change the greedy output (tokens or logprobs) against the backbone, so an ignored
task cannot flatter the numbers.

Workload per (kind, N): max(REQUESTS, N) streaming /v1/completions of ISL random token ids and
exactly OSL tokens (ignore_eos), CONCURRENCY in flight; request i runs task order[i % N] (a seeded
random order), so every one of the N tasks is stored and served at least once (N = 1024 sends 1024
requests: fewer would touch only as many tasks as requests), then the same prompts on model "base".
N values run in increasing order with fresh task names. tok_s: output tokens over the wall clock
from the first send to the last token. TTFT: send to first token; ITL: gaps between
consecutive tokens of a stream. Adapter loads: deltas of the server's /metrics counters over each
task run. With --repeats R the task and plain runs alternate R times and each side keeps its best
(later repeats find whatever the caches kept). Prints one JSON object last and appends to RESULTS.md."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import httpx
import torch
from safetensors.torch import save as save_safetensors

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))
from adapter_cases import ipt_artifacts
from common import append_results, free_port, machine, percentile, start_server, stream

from prefixserve.adapters_store.fingerprint import backbone_fingerprint
from prefixserve.adapters_store.format import artifact_version, encode_artifact
from prefixserve.adapters_store.kinds import lora_features
from prefixserve.adapters_store.local_store import LocalStore
from prefixserve.adapters_store.peft_import import import_peft
from prefixserve.config import AdapterLimits, ModelConfig
from prefixserve.engine.task_pointers import BASE_TASK
from prefixserve.engine.tenancy import DEFAULT_TENANT, tenant_task
from prefixserve.models.loader import load_backbone

KINDS = ("lora8", "lora64", "prefix", "prompt", "ptuning", "intrinsic", "ia3", "bitfit", "adapter", "mixed", "mixed3")
MIXES = {"mixed": ("lora8", "prefix", "prompt", "intrinsic", "ia3", "bitfit", "adapter"),
         "mixed3": ("lora8", "prefix", "prompt")}
BOTTLENECK_SIZE = 16
NUM_VIRTUAL_TOKENS = 16
INTRINSIC_DIM = 16
LORA_TARGETS = ("k_proj", "o_proj", "q_proj", "v_proj")  # sorted, as the lora kind's config lists them
SUBSPACE_TASK = "ipt-subspace"
COUNTERS = {"cold_loads": "prefixserve_adapter_cold_loads", "device_evictions": "prefixserve_device_evictions",
            "host_cache_evictions": "prefixserve_host_cache_evictions"}


class TaskFactory:
    """Distinct random tasks of every benchmarked kind, as artifact bytes for SmolLM2 (seeded)."""

    def __init__(self, seed: int = 0):
        backbone = load_backbone(ModelConfig())
        self.arch, self.fingerprint = backbone.arch, backbone_fingerprint(backbone)
        self.gen = torch.Generator().manual_seed(seed)
        self.subspace = ipt_artifacts(self.arch.hidden_size, self.fingerprint, d=INTRINSIC_DIM,
                                      num_tokens=NUM_VIRTUAL_TOKENS, seed=seed)[0]
        self.subspace_version = artifact_version(self.subspace)

    def _randn(self, *shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=self.gen) * scale

    def make(self, kind: str) -> tuple[str, bytes]:
        """(stored kind, artifact bytes) of a fresh task of benchmarked kind `kind` (not a mix)."""
        a, p = self.arch, NUM_VIRTUAL_TOKENS
        if kind in ("lora8", "lora64"):
            return "lora", self._lora(int(kind.removeprefix("lora")))
        if kind == "prefix":  # keys, values: [L, P, Hkv, D], of the tests' magnitude
            shape = (a.num_layers, p, a.num_kv_heads, a.head_dim)
            return "prefix", encode_artifact("prefix", {"num_virtual_tokens": p}, {
                "keys": self._randn(*shape), "values": self._randn(*shape)}, self.fingerprint)
        if kind == "prompt":
            return "prompt", encode_artifact("prompt", {"num_virtual_tokens": p},
                                             {"embeddings": self._randn(p, a.hidden_size, scale=0.3)}, self.fingerprint)
        if kind == "ptuning":
            return "prompt", self._ptuning()
        if kind == "intrinsic":
            return "intrinsic", encode_artifact("intrinsic", {"subspace_version": self.subspace_version},
                                                {"z": self._randn(INTRINSIC_DIM)}, self.fingerprint)
        if kind == "ia3":
            return "ia3", self._ia3()
        if kind == "bitfit":  # biases of the parity tests' magnitude, on every projection's output
            features = lora_features(a)
            tensors = {f"layers.{layer}.{t}.bias": self._randn(features[t][1], scale=0.02)
                       for layer in range(a.num_layers) for t in sorted(features)}
            return "bitfit", encode_artifact("bitfit", {"targets": sorted(features)}, tensors, self.fingerprint)
        if kind == "adapter":
            return "adapter", self._bottleneck()
        raise ValueError(f"expected a kind among {[k for k in KINDS if k not in MIXES]}, found {kind!r}")

    def _ia3(self) -> bytes:
        features, tensors = lora_features(self.arch), {}
        for layer in range(self.arch.num_layers):  # scales near 1 (peft starts at ones), as trained ones stay
            for target, side in (("k_proj", 1), ("v_proj", 1), ("down_proj", 0)):
                tensors[f"layers.{layer}.{target}.ia3"] = 1 + self._randn(features[target][side], scale=0.2)
        return encode_artifact("ia3", {"targets": ["down_proj", "k_proj", "v_proj"], "feedforward": ["down_proj"]},
                               tensors, self.fingerprint)

    def _bottleneck(self) -> bytes:
        r, hidden, tensors = BOTTLENECK_SIZE, self.arch.hidden_size, {}
        for layer in range(self.arch.num_layers):  # the parity tests' magnitude
            for placement in ("attention", "mlp"):
                stem = f"layers.{layer}.{placement}"
                tensors |= {f"{stem}.down": self._randn(r, hidden, scale=0.05),
                            f"{stem}.down_bias": self._randn(r, scale=0.05),
                            f"{stem}.up": self._randn(hidden, r, scale=0.05),
                            f"{stem}.up_bias": self._randn(hidden, scale=0.05)}
        return encode_artifact("adapter", {"size": r, "placements": ["attention", "mlp"], "activation": "relu"},
                               tensors, self.fingerprint)

    def _lora(self, rank: int) -> bytes:
        features, tensors = lora_features(self.arch), {}
        for layer in range(self.arch.num_layers):
            for target in LORA_TARGETS:
                fan_in, fan_out = features[target]
                # A near peft's kaiming init, B small: the delta changes the outputs but keeps them sane
                tensors[f"layers.{layer}.{target}.lora_a"] = self._randn(rank, fan_in, scale=fan_in ** -0.5)
                tensors[f"layers.{layer}.{target}.lora_b"] = self._randn(fan_out, rank, scale=0.02)
        return encode_artifact("lora", {"rank": rank, "alpha": 16.0, "use_rslora": False,
                                        "targets": list(LORA_TARGETS)}, tensors, self.fingerprint)

    def _ptuning(self) -> bytes:
        """A PEFT P_TUNING adapter as peft saves it (prompt_embeddings = its MLP encoder's output on the
        virtual-token embeddings), zipped and converted by import_peft, as an upload of it would be."""
        h, p, encoder_hidden = self.arch.hidden_size, NUM_VIRTUAL_TOKENS, 128
        w1, w2 = self._randn(h, encoder_hidden, scale=h ** -0.5), self._randn(encoder_hidden, h, scale=0.3)
        embeddings = torch.relu(self._randn(p, h) @ w1) @ w2  # [P, hidden]
        config = {"peft_type": "P_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": p,
                  "num_layers": self.arch.num_layers, "token_dim": h, "num_transformer_submodules": 1,
                  "encoder_reparameterization_type": "MLP", "encoder_hidden_size": encoder_hidden}
        archive = io.BytesIO()
        with zipfile.ZipFile(archive, "w") as z:
            z.writestr("adapter_config.json", json.dumps(config))
            z.writestr("adapter_model.safetensors", save_safetensors({"prompt_embeddings": embeddings.contiguous()}))
        return import_peft(archive.getvalue(), arch=self.arch, fingerprint=self.fingerprint, limits=AdapterLimits())


def task_order(num_requests: int, num_tasks: int, seed: int) -> list[int]:
    """The task index of each request: request i gets order[i % N], a seeded random order of the N."""
    order = torch.randperm(num_tasks, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i % num_tasks] for i in range(num_requests)]


def fill_store(store_dir: str, factory: TaskFactory, tasks: dict[str, str]) -> None:
    """Write tasks (name -> benchmarked kind) and the shared subspace under the names the server gives
    the default tenant's tasks (`default/<task>`)."""
    store = LocalStore(Path(store_dir))
    try:
        store.put(tenant_task(DEFAULT_TENANT, SUBSPACE_TASK, BASE_TASK), factory.subspace, "subspace")
        for name, kind in tasks.items():
            stored_kind, data = factory.make(kind)
            requires = (factory.subspace_version,) if stored_kind == "intrinsic" else ()
            store.put(tenant_task(DEFAULT_TENANT, name, BASE_TASK), data, stored_kind, requires)
    finally:
        store.close()


async def timed_stream(client: httpx.AsyncClient, slots: asyncio.Semaphore, model: str, prompt: list[int],
                       osl: int) -> tuple[float, list[float]]:
    async with slots:
        stamps: list[float] = []
        sent = time.monotonic()
        await stream(client, prompt, osl, stamps, model=model)
        return sent, stamps


async def run_requests(base_url: str, models: list[str], prompts: list[list[int]], osl: int,
                       concurrency: int) -> dict:
    slots = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(base_url=base_url, timeout=600, limits=limits) as client:
        runs = await asyncio.gather(*(timed_stream(client, slots, m, p, osl) for m, p in zip(models, prompts)))
    wall_s = max(stamps[-1] for _, stamps in runs) - min(sent for sent, _ in runs)
    ttft = [stamps[0] - sent for sent, stamps in runs]
    itl = [(b - a) * 1e3 for _, stamps in runs for a, b in zip(stamps, stamps[1:])]
    return {"tok_s": round(sum(len(stamps) for _, stamps in runs) / wall_s, 1), "wall_s": round(wall_s, 2),
            "ttft_p50_s": round(percentile(ttft, 0.5), 3), "ttft_p99_s": round(percentile(ttft, 0.99), 3),
            "itl_p50_ms": round(percentile(itl, 0.5), 1), "itl_p99_ms": round(percentile(itl, 0.99), 1)}


def adapter_counters(base_url: str) -> dict[str, float]:
    """The server's adapter counters from /metrics (open: this server has no API or metrics keys)."""
    r = httpx.get(f"{base_url}/metrics", timeout=30)
    r.raise_for_status()
    samples = dict(line.rsplit(" ", 1) for line in r.text.splitlines() if line and not line.startswith("#"))
    return {key: float(samples.get(f"{name}_total", samples.get(name, "nan"))) for key, name in COUNTERS.items()}


def check_tasks_apply(base_url: str, names: list[str], prompt: list[int]) -> None:
    """Refuse to measure unless each task's greedy output (text or logprobs) differs from the backbone's."""
    def greedy(model: str) -> tuple[str, list[float]]:
        body = {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True,
                "logprobs": 0}
        r = httpx.post(f"{base_url}/v1/completions", json=body, timeout=600)
        if r.status_code != 200:
            raise RuntimeError(f"check request for {model!r} refused: {r.status_code} {r.text[:300]}")
        choice = r.json()["choices"][0]
        return choice["text"], choice["logprobs"]["token_logprobs"]

    base_text, base_logprobs = greedy(BASE_TASK)
    for name in names:
        text, logprobs = greedy(name)
        if text == base_text and max(abs(a - b) for a, b in zip(logprobs, base_logprobs)) < 1e-4:
            raise RuntimeError(f"task {name!r} gives the backbone's greedy output and logprobs: the server "
                               f"does not apply it, so its numbers would mean nothing")


def measure(base_url: str, models: list[str], prompts: list[list[int]], args) -> dict:
    tasks_runs, plain_runs, loads = [], [], []
    for _ in range(args.repeats):  # alternating, so drift hits both sides alike
        before = adapter_counters(base_url)
        tasks_runs.append(asyncio.run(run_requests(base_url, models, prompts, args.osl, args.concurrency)))
        after = adapter_counters(base_url)
        loads.append({key: after[key] - before[key] for key in COUNTERS})
        plain_runs.append(asyncio.run(run_requests(base_url, [BASE_TASK] * len(models), prompts, args.osl,
                                                   args.concurrency)))
    tasks, plain = (max(runs, key=lambda r: r["tok_s"]) for runs in (tasks_runs, plain_runs))
    return {"requests": len(models), "tasks_used": len(set(models)), **tasks, "plain_tok_s": plain["tok_s"],
            "ratio": round(tasks["tok_s"] / plain["tok_s"], 3),
            **{f"plain_{key}": plain[key] for key in ("ttft_p50_s", "ttft_p99_s", "itl_p50_ms", "itl_p99_ms")},
            **{key: [int(run[key]) for run in loads] for key in COUNTERS},
            "all_tok_s": {"tasks": [r["tok_s"] for r in tasks_runs], "plain": [r["tok_s"] for r in plain_runs]}}


def bench_kind(kind: str, factory: TaskFactory, prompts: list[list[int]], args) -> dict:
    """One server for the kind: write its tasks, start it, warm it up, check the tasks apply, measure each N."""
    cycle = MIXES.get(kind, (kind,))
    models = {n: [f"{kind}-n{n}-{j}" for j in task_order(max(args.requests, n), n, seed=n)] for n in args.tasks}
    checks = {f"check-{k}": k for k in cycle}
    tasks = {**checks, **{name: cycle[int(name.rsplit("-", 1)[1]) % len(cycle)]
                          for names in models.values() for name in names}}
    port = free_port()
    with tempfile.TemporaryDirectory(prefix=f"many-tasks-{kind}-") as tmp:
        store_dir = os.path.join(tmp, "store")
        setup_start = time.monotonic()
        fill_store(store_dir, factory, tasks)
        print(f"{kind}: {len(tasks)} tasks stored in {time.monotonic() - setup_start:.1f} s", file=sys.stderr)
        server = start_server(port, store_dir, ["--max-num-seqs", str(args.concurrency), "--max-lora-rank", "64",
                                                "--device", args.device])
        base_url = f"http://127.0.0.1:{port}"
        try:
            warm = prompts[:min(len(prompts), 8)]
            asyncio.run(run_requests(base_url, [BASE_TASK] * len(warm), warm, 4, args.concurrency))
            check_tasks_apply(base_url, list(checks), prompts[0][:32])
            results = {}
            for n in args.tasks:
                results[n] = measure(base_url, models[n], prompts[:len(models[n])], args)
                print(f"{kind} N={n}: {json.dumps(results[n])}", file=sys.stderr)
        finally:
            server.terminate()
            server.wait(30)
    return results


def cell(r: dict) -> str:
    return f"{r['ratio']:.2f} (TTFT p99 {r['ttft_p99_s']:.1f} s vs {r['plain_ttft_p99_s']:.1f} s)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma list of {', '.join(KINDS)}")
    parser.add_argument("--tasks", default="1,16,128,1024", help="comma list of N (distinct tasks)")
    parser.add_argument("--requests", type=int, default=128, help="requests per cell (at least N)")
    parser.add_argument("--isl", type=int, default=128)
    parser.add_argument("--osl", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=64, help="requests in flight")
    parser.add_argument("--repeats", type=int, default=1, help="task/plain pairs, alternating; each keeps its best")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := sorted(set(kinds) - set(KINDS)):
        parser.error(f"expected kinds among {', '.join(KINDS)}, found {', '.join(unknown)}")
    args.tasks = sorted({int(n) for n in args.tasks.split(",")})

    factory = TaskFactory()
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1000, factory.arch.vocab_size, (args.isl,), generator=gen).tolist()
               for _ in range(max(args.requests, *args.tasks))]
    results = {kind: bench_kind(kind, factory, prompts, args) for kind in kinds}
    result = {"benchmark": "many_tasks", "model": "SmolLM2-135M-Instruct fp32", "device": args.device,
              "machine": machine(), "requests": args.requests, "isl": args.isl, "osl": args.osl,
              "concurrency": args.concurrency, "repeats": args.repeats, "num_virtual_tokens": NUM_VIRTUAL_TOKENS,
              "results": results}
    if not args.no_record:
        append_results("many_tasks", [
            f"max({args.requests}, N) streaming requests per cell (ISL {args.isl}, OSL {args.osl}, ignore_eos), "
            f"{args.concurrency} in flight, request i on task i % N (seeded order; every one of the N tasks "
            f"served), then the same prompts on the plain backbone in the same server; SmolLM2 fp32 on "
            f"{args.device}, one server process per kind, best of {args.repeats}. Cell: tasks tok/s / plain tok/s "
            f"(TTFT p99 tasks vs plain).",
            "",
            "| N | " + " | ".join(kinds) + " |",
            "|---|" + "---|" * len(kinds),
            *(f"| {n} | " + " | ".join(cell(results[k][n]) for k in kinds) + " |" for n in args.tasks),
            "", "```json", json.dumps(result), "```"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
