"""Compile every Triton kernel for real NVIDIA GPUs on a machine that has none, and report what ptxas
made of it: registers, spilled bytes and shared memory per kernel and specialization.

The interpreter tests check what the kernels compute, but the interpreter never lowers them: a tile
that `tl.dot` rejects, a layout that does not fit shared memory or registers that spill show up only
when Triton compiles for a GPU. Triton compiles ahead of time for a named target with the ptxas it
ships, so this runs anywhere Triton's NVIDIA backend is installed.

Each launcher runs on small CPU tensors with its kernels swapped for recorders, so the compiled
specializations (dtypes, constexpr tiles, num_warps) are exactly the launchers' own.

    python tests/kernels/gpu_compile.py   # one JSON object: {"kernels": [...]}

Must run without TRITON_INTERPRET (under it, @triton.jit makes interpreted functions).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler import compile as triton_compile

from prefixserve.kernels import (
    cascade_attention,
    decode_attention,
    lora,
    lora_meta,
    merge_attn_states,
    prefill_attention,
)

sys.path.insert(0, str(Path(__file__).parent))
from attention_cases import make_batch

KERNEL_MODULES = (decode_attention, prefill_attention, cascade_attention, merge_attn_states, lora)
# Largest shared memory one block may opt into (CUDA programming guide, compute capabilities 8.0 and 9.0).
TARGETS = {"sm_90": (GPUTarget("cuda", 90, 32), 232_448), "sm_80": (GPUTarget("cuda", 80, 32), 166_912)}
POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32", torch.int32: "*i32",
                 torch.int64: "*i64"}
SM80_CASES = (" float16 d128 gqa2", " float16 r16", " bfloat16 d64 gqa2")
LLAMA_1B_HEADS = (32, 8)  # Llama-3.2-1B: 32 query heads over 8 KV heads (the 16/8 has GQA 2, below)


def kernel_attributes() -> list[tuple[object, str, triton.runtime.JITFunction]]:
    """(module, name, kernel) of every kernel the launchers launch (module attributes that are Triton
    kernels; @triton.jit helpers they call are not named *_kernel)."""
    return [(module, name, value) for module in KERNEL_MODULES for name, value in vars(module).items()
            if isinstance(value, triton.runtime.JITFunction) and name.endswith("_kernel")]


@contextmanager
def recorded_launches():
    """Swap every kernel of KERNEL_MODULES for a recorder; yields the list of (kernel, args, kwargs)."""
    launches, originals = [], kernel_attributes()

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))

    for module, name, kernel in originals:
        setattr(module, name, Recorder(kernel))
    try:
        yield launches
    finally:
        for module, name, value in originals:
            setattr(module, name, value)


def specialization(kernel, args, kwargs) -> tuple[dict, dict, dict]:
    """(signature, constexprs, options) of one launch, as Triton's JIT would specialize it (pointers
    by dtype, ints as i32: the launchers' sizes and strides all fit)."""
    values = dict(zip(kernel.arg_names, args)) | {k: v for k, v in kwargs.items() if k in kernel.arg_names}
    signature, constexprs = {}, {}
    for param in kernel.params:
        value = values[param.name]
        if param.is_constexpr:
            signature[param.name], constexprs[param.name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[param.name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, bool):
            signature[param.name] = "i1"
        elif isinstance(value, int):
            signature[param.name] = "i32"
        elif isinstance(value, float):
            signature[param.name] = "fp32"
        else:
            raise TypeError(f"{kernel.__name__}: argument {param.name} of type {type(value).__name__}")
    options = {k: v for k, v in kwargs.items() if k not in kernel.arg_names}
    return signature, constexprs, options


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG, STACK, SHARED (static) and LOCAL (spill) bytes of the cubin's one function, from cuobjdump."""
    cuobjdump = Path(triton.backends.nvidia.__file__).parent / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        report = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True,
                                check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", report))
    return {k.lower(): int(v) for k, v in fields.items()}


def attention_cases(dtype: torch.dtype, head_dim: int, heads: tuple[int, int]):
    """(label, launcher thunk) for decode (split and not), prefill, cascade (decode and prefill) and merge."""
    tag = f"{str(dtype).removeprefix('torch.')} d{head_dim} gqa{heads[0] // heads[1]}"
    mixed = make_batch([21, 0], [(0, 40, 1), (1, 9, 9), (0, 300, 1)], num_heads=heads[0], num_kv_heads=heads[1],
                       head_dim=head_dim, dtype=dtype)
    decode = make_batch([21, 0], [(0, 40, 1), (1, 9, 1), (0, 300, 1)], num_heads=heads[0], num_kv_heads=heads[1],
                        head_dim=head_dim, dtype=dtype)
    paged = (decode.q, decode.k_cache, decode.v_cache, decode.seq_lens, decode.page_table, decode.prefix_lens,
             decode.prefix_page_table, 0.125)

    def cascade(batch, max_query_len):
        return lambda: cascade_attention.cascade_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.page_table,
            batch.cu_seqs_per_task(), batch.task_prefix_lens, batch.task_prefix_page_table, 0.125,
            max_query_len=max_query_len)

    return [
        (f"decode {tag}", lambda: decode_attention.decode_attention(*paged, num_splits=1)),
        (f"decode split {tag}", lambda: decode_attention.decode_attention(*paged, num_splits=4, return_lse=True)),
        (f"prefill {tag}", lambda: prefill_attention.prefill_attention(*mixed.paged_args(), 0.125,
                                                                        return_lse=True)),
        (f"cascade decode {tag}", cascade(decode, 1)),
        (f"cascade prefill {tag}", cascade(mixed, None)),
    ]


def lora_cases(dtype: torch.dtype, max_rank: int):
    tag = f"{str(dtype).removeprefix('torch.')} r{max_rank}"
    in_features, out_features = 2048, 512  # Llama-3.2-1B hidden size; a KV projection's width
    ranks = [max_rank, 8, 1, 3] * 4  # 16 adapters of mixed ranks: only meta.max_rank reaches the kernels
    starts = np.cumsum([1] + ranks)  # row 0 is the zero row
    segment_rows = [list(range(start, start + r)) for start, r in zip(starts, ranks)]
    lora_a = torch.zeros(int(starts[-1]), in_features, dtype=dtype)
    lora_b = torch.zeros(int(starts[-1]), out_features, dtype=dtype)

    def run(num_tokens: int, split_k: int):
        meta = lora_meta.lora_batch_metadata(np.arange(num_tokens) % 16, segment_rows, [1.0] * 16,
                                             torch.device("cpu"))
        x = torch.zeros(num_tokens, in_features, dtype=dtype)
        h = lora.lora_shrink(x, lora_a, meta, split_k=split_k)
        lora.lora_expand(h, lora_b, torch.zeros(num_tokens, out_features, dtype=dtype), meta)

    return [(f"lora decode {tag}", lambda: run(16, 4)), (f"lora prefill {tag}", lambda: run(16 * 80, 1))]


def cases():
    out = []
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        for head_dim in (64, 128):
            out += attention_cases(dtype, head_dim, (16, 8))
        out += lora_cases(dtype, 16)
    for heads in (LLAMA_1B_HEADS, (8, 1), (3, 1)):  # GQA 4, 8 and an odd group
        out += attention_cases(torch.float16, 128, heads)
    out += lora_cases(torch.float16, 64) + lora_cases(torch.float32, 64)  # fp32 at rank 64 needs narrower tiles
    return out


def main() -> None:
    if triton.knobs.runtime.interpret:
        sys.exit("unset TRITON_INTERPRET: under the interpreter there is nothing to compile")
    specializations = {}  # key -> (case label, kernel, signature, constexprs, options)
    for label, launch in cases():
        with recorded_launches() as launches:
            launch()
        for kernel, args, kwargs in launches:
            signature, constexprs, options = specialization(kernel, args, kwargs)
            key = json.dumps([kernel.__name__, signature, constexprs, options], sort_keys=True, default=str)
            specializations.setdefault(key, (label, kernel, signature, constexprs, options))
    results = []
    for target_name, (target, max_shared) in TARGETS.items():
        for label, kernel, signature, constexprs, options in specializations.values():
            if target_name == "sm_80" and not label.endswith(SM80_CASES):
                continue  # enough to catch what differs from sm_90 (no wgmma, less shared memory)
            started = time.monotonic()
            compiled = triton_compile(ASTSource(kernel, signature, constexprs), target=target, options=options)
            usage = resource_usage(compiled.asm["cubin"])
            results.append({"kernel": kernel.__name__, "case": label, "target": target_name,
                            "registers": usage["reg"], "spill_bytes": usage["local"], "stack_bytes": usage["stack"],
                            "shared_bytes": usage["shared"] + compiled.metadata.shared,
                            "max_shared_bytes": max_shared, "num_warps": compiled.metadata.num_warps,
                            "constexprs": {k: str(v) for k, v in constexprs.items()},
                            "seconds": round(time.monotonic() - started, 2)})
    print(json.dumps({"kernels": results, "launched_kernels": sorted(name for _, name, _ in kernel_attributes())}))


if __name__ == "__main__":
    main()
