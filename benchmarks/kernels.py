"""How fast are the Triton kernels on this GPU, against the memory system and the torch references?

Llama-3.2-1B-like attention (16 heads, 8 KV heads, head_dim 64/128, fp16, page 16):
  decode    achieved KV bandwidth vs a device-to-device copy measured in the same run, and vs the
            torch reference, over batch x prefix x own context (8 tasks per batch);
  prefix    prefix-segment overhead: prefix P + own C against plain paged decode of P + C own tokens;
  cascade   per-sequence mixed-prefix decode vs cascade for 1/8/64 tasks per batch;
  prefill   prefix-aware chunked prefill vs the reference;
  lora      batched LoRA (16 adapters of rank 16 on scattered rows of one pool, 2048 -> 2048)
            vs a per-adapter torch loop over dense weights.
Bandwidth counts the KV bytes each sequence reads (a prefix shared by several sequences counts once
per sequence), so shared prefixes served from L2 can exceed the copy bandwidth.

Usage: python benchmarks/kernels.py [--quick]. Prints one JSON object last and appends a dated
section to benchmarks/RESULTS.md. Without CUDA it prints a "skipped" object and exits 0.
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import torch

RESULTS = Path(__file__).with_name("RESULTS.md")
NUM_HEADS, NUM_KV_HEADS, PAGE_SIZE, DTYPE = 16, 8, 16, torch.float16
REFERENCE_MAX_TOKENS = 1 << 19  # the reference gathers KV densely in fp32; skip it beyond this


def sweeps(quick: bool) -> dict:
    if quick:
        return {"head_dims": [64], "batches": [1, 64], "owns": [64, 1024], "prefixes": [0, 200],
                "cascade": [(64, 512, 256)], "prefill": [(1, 512, 0, 512)], "lora_tokens": [16, 256]}
    return {"head_dims": [64, 128], "batches": [1, 16, 64, 256], "owns": [64, 512, 4096],
            "prefixes": [0, 16, 64, 200, 512, 2048],
            "cascade": [(64, 512, 256), (256, 512, 256), (256, 2048, 256), (64, 2048, 1024)],
            "prefill": [(1, 512, 0, 512), (4, 512, 0, 512), (4, 512, 1024, 512), (2, 2048, 0, 2048)],
            "lora_tokens": [1, 16, 64, 256, 1024, 4096]}


class Cache:
    """A KV pool with pages handed out in random order, and the tables that address it."""

    def __init__(self, batch, prefix_len, own_len, num_tasks, head_dim, device, query_len=1):
        num_tasks = min(num_tasks, batch)
        pre_pages, own_pages = -(-prefix_len // PAGE_SIZE), -(-own_len // PAGE_SIZE)
        num_pages = num_tasks * pre_pages + batch * own_pages
        shape = (num_pages, PAGE_SIZE, NUM_KV_HEADS, head_dim)
        self.k, self.v = torch.randn(shape, dtype=DTYPE, device=device), torch.randn(shape, dtype=DTYPE, device=device)
        perm = torch.randperm(num_pages, device=device).to(torch.int32)
        task_tables = perm[: num_tasks * pre_pages].view(num_tasks, pre_pages)
        seq_task = torch.arange(batch, device=device) * num_tasks // batch  # sorted by task, as cascade needs
        self.page_table = perm[num_tasks * pre_pages:].view(batch, own_pages)
        self.prefix_page_table = task_tables[seq_task] if pre_pages else torch.zeros(batch, 1, dtype=torch.int32,
                                                                                     device=device)
        self.seq_lens = torch.full((batch,), own_len, dtype=torch.int32, device=device)
        self.prefix_lens = torch.full((batch,), prefix_len, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(batch + 1, dtype=torch.int32, device=device) * query_len
        self.q = torch.randn(batch * query_len, NUM_HEADS, head_dim, dtype=DTYPE, device=device)
        self.task_prefix_lens = torch.full((num_tasks,), prefix_len, dtype=torch.int32, device=device)
        self.task_prefix_page_table = task_tables if pre_pages else torch.zeros(num_tasks, 1, dtype=torch.int32,
                                                                                device=device)
        counts = torch.bincount(seq_task, minlength=num_tasks)
        self.cu_seqs_per_task = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(torch.int32)
        self.seqs_per_task = counts.tolist()
        self.kv_bytes = batch * (prefix_len + own_len) * NUM_KV_HEADS * head_dim * 2 * DTYPE.itemsize
        self.scale = head_dim ** -0.5

    def paged(self):
        return (self.q, self.k, self.v, self.cu_seqlens_q, self.seq_lens, self.page_table, self.prefix_lens,
                self.prefix_page_table, self.scale)


def decode_fn(c: Cache):
    from prefixserve.kernels.decode_attention import decode_attention

    max_kv = int(c.prefix_lens[0] + c.seq_lens[0])
    return lambda: decode_attention(c.q, c.k, c.v, c.seq_lens, c.page_table, c.prefix_lens, c.prefix_page_table,
                                    c.scale, max_kv_len=max_kv)


def bench_decode(s, device, timer, copy_gbs) -> list[dict]:
    from prefixserve.kernels.paged_attention import paged_attention_reference

    rows = []
    for d in s["head_dims"]:
        for b in s["batches"]:
            for own in s["owns"]:
                for p in s["prefixes"]:
                    c = Cache(b, p, own, 8, d, device)
                    t = timer(decode_fn(c))
                    row = {"head_dim": d, "batch": b, "prefix": p, "own": own, "triton_us": t * 1e3,
                           "gbs": c.kv_bytes / t / 1e6, "copy_fraction": c.kv_bytes / t / 1e6 / copy_gbs}
                    if b * (p + own) <= REFERENCE_MAX_TOKENS:
                        row["reference_us"] = timer(lambda c=c: paged_attention_reference(*c.paged())) * 1e3
                        row["speedup"] = row["reference_us"] / row["triton_us"]
                    rows.append(row)
                    del c
    return rows


def bench_prefix_overhead(s, device, timer) -> list[dict]:
    """Distinct prefix per sequence, so both variants read the same bytes; only the segment logic differs."""
    rows = []
    for b in s["batches"]:
        for p in [p for p in s["prefixes"] if p]:
            own = 1024 if 1024 in s["owns"] else s["owns"][-1]
            with_prefix = timer(decode_fn(Cache(b, p, own, b, 64, device)))
            plain = timer(decode_fn(Cache(b, 0, p + own, b, 64, device)))
            rows.append({"batch": b, "prefix": p, "own": own, "prefix_us": with_prefix * 1e3, "plain_us": plain * 1e3,
                         "overhead": with_prefix / plain - 1})
    return rows


def bench_cascade(s, device, timer) -> list[dict]:
    from prefixserve.kernels.cascade_attention import cascade_attention
    from prefixserve.kernels.cascade_plan import should_use_cascade

    rows = []
    for b, p, own in s["cascade"]:
        for tasks in sorted({min(t, b) for t in (1, 8, 64)}):
            c = Cache(b, p, own, tasks, 64, device)
            per_task = -(-b // tasks)
            cascade = timer(lambda c=c, n=per_task: cascade_attention(
                c.q, c.k, c.v, c.cu_seqlens_q, c.seq_lens, c.page_table, c.cu_seqs_per_task, c.task_prefix_lens,
                c.task_prefix_page_table, c.scale, max_tokens_per_task=n, max_query_len=1))
            per_seq = timer(decode_fn(c))
            rows.append({"batch": b, "prefix": p, "own": own, "tasks": tasks, "per_seq_us": per_seq * 1e3,
                         "cascade_us": cascade * 1e3, "cascade_speedup": per_seq / cascade,
                         "heuristic_says_cascade": should_use_cascade(c.seqs_per_task, [p] * len(c.seqs_per_task))})
    return rows


def bench_prefill(s, device, timer) -> list[dict]:
    from prefixserve.kernels.paged_attention import paged_attention_reference
    from prefixserve.kernels.prefill_attention import prefill_attention

    rows = []
    for b, p, context, chunk in s["prefill"]:
        c = Cache(b, p, context + chunk, 8, 64, device, query_len=chunk)
        t = timer(lambda c=c: prefill_attention(*c.paged()))
        visible = b * chunk * (p + context + (chunk + 1) / 2)  # query-key pairs
        row = {"batch": b, "prefix": p, "context": context, "chunk": chunk, "triton_us": t * 1e3,
               "tflops": 4 * visible * NUM_HEADS * 64 / t / 1e9}
        row["reference_us"] = timer(lambda c=c: paged_attention_reference(*c.paged())) * 1e3
        row["speedup"] = row["reference_us"] / row["triton_us"]
        rows.append(row)
    return rows


def bench_lora(s, device, timer, num_adapters=16, rank=16, hidden=2048) -> list[dict]:
    import numpy as np

    from prefixserve.kernels.lora import add_lora
    from prefixserve.kernels.lora_meta import ZERO_ROW, lora_batch_metadata

    pool_rows = 1 + num_adapters * rank  # every adapter's rows, and the zero row
    a = torch.randn(pool_rows, hidden, dtype=DTYPE, device=device) / 32  # [pool_rows, in]
    b = torch.randn(pool_rows, hidden, dtype=DTYPE, device=device) / 32  # [pool_rows, out]
    a[ZERO_ROW] = b[ZERO_ROW] = 0
    owned = (torch.randperm(pool_rows - 1) + 1).view(num_adapters, rank)  # scattered rows, as after churn
    segment_rows = owned.tolist()
    # The loop gets each adapter's weights dense and contiguous, as a model holding PEFT tensors would.
    dense = [(a[ids].contiguous(), b[ids].contiguous()) for ids in owned.to(device)]  # [r, in], [r, out]
    scale = 2.0
    rows = []
    for n in s["lora_tokens"]:
        x = torch.randn(n, hidden, dtype=DTYPE, device=device)
        y = torch.randn(n, hidden, dtype=DTYPE, device=device)
        token_adapters = np.random.default_rng(n).integers(0, num_adapters, n)  # segment s = adapter s
        meta = lora_batch_metadata(token_adapters, segment_rows, [scale] * num_adapters, torch.device(device))
        groups = [(i, torch.from_numpy(np.flatnonzero(token_adapters == i)).to(device)) for i in range(num_adapters)]
        groups = [(i, idx) for i, idx in groups if idx.numel()]

        def loop(x=x, y=y, groups=groups):  # what a model without a batched op does
            for i, idx in groups:
                a_i, b_i = dense[i]
                y[idx] += scale * ((x[idx] @ a_i.T) @ b_i)

        t_triton = timer(lambda x=x, y=y, meta=meta: add_lora(x, y, a, b, meta))
        t_loop = timer(loop)
        rows.append({"tokens": n, "triton_us": t_triton * 1e3, "torch_loop_us": t_loop * 1e3,
                     "speedup": t_loop / t_triton})
    return rows


def copy_bandwidth(device, timer, nbytes=1 << 30) -> float:
    """GB/s of a large device-to-device copy: read + write."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * nbytes / timer(lambda: dst.copy_(src)) / 1e6


def run(quick: bool, device: str, timer) -> dict:
    s = sweeps(quick)
    copy_gbs = copy_bandwidth(device, timer)
    return {"benchmark": "kernels", "quick": quick, "copy_gbs": copy_gbs,
            "decode": bench_decode(s, device, timer, copy_gbs),
            "prefix_overhead": bench_prefix_overhead(s, device, timer),
            "cascade": bench_cascade(s, device, timer), "prefill": bench_prefill(s, device, timer),
            "lora": bench_lora(s, device, timer)}


def table(rows: list[dict]) -> str:
    if not rows:
        return "(none)\n"
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v) -> str:
        return "" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def append_results(result: dict) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    text = "" if RESULTS.exists() else "# Benchmark results\n"
    text += (f"\n## kernels — {stamp} — {result['device']}{' (--quick)' if result['quick'] else ''}\n\n"
             f"fp16, {NUM_HEADS} heads / {NUM_KV_HEADS} KV heads, page {PAGE_SIZE}. "
             f"Device-to-device copy: {result['copy_gbs']:.0f} GB/s.\n")
    for name in ("decode", "prefix_overhead", "cascade", "prefill", "lora"):
        text += f"\n### {name}\n\n" + table(result[name])
    with RESULTS.open("a") as f:
        f.write(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a small sweep (a minute or so)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "kernels", "skipped": "no CUDA device"}))
        return 0
    from triton.testing import do_bench

    def timer(fn) -> float:  # milliseconds, median of repeated runs
        return do_bench(fn, warmup=25, rep=100, return_mode="median")

    result = run(args.quick, "cuda", timer)
    result["device"] = torch.cuda.get_device_name()
    append_results(result)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
