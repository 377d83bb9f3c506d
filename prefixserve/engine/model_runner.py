"""Owns the device state (KV pool, LoRA, vector and bottleneck pools); turns a SchedulerOutput into flat varlen batch
metadata and runs the backbone. Only the rows that will be sampled reach the LM head."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from prefixserve.engine.bottleneck_pool import BottleneckAllocation, BottleneckPool
from prefixserve.engine.lora_pool import LoRAAllocation, LoRAPool, bytes_per_row
from prefixserve.engine.request import Request, TopLogprobs
from prefixserve.engine.scheduler_output import SchedulerOutput
from prefixserve.engine.vector_pool import VectorPool
from prefixserve.kernels.bottleneck import plan_bottleneck
from prefixserve.kernels.cascade_plan import plan_cascade
from prefixserve.kernels.kv_store import store_kv
from prefixserve.kernels.lora_meta import lora_batch_metadata
from prefixserve.kernels.lora_stage import LoRAStage
from prefixserve.kernels.paged_attention import PagedAttentionMetadata
from prefixserve.models.llama import BottleneckStep, LoRAStep, VectorStep
from prefixserve.models.loader import Backbone

# Rows of the LM head computed at once for prompt logprobs: bounds the [rows, vocab] buffers.
PROMPT_LOGPROBS_ROWS = 256


@dataclass
class PromptScoring:
    """Prompt positions of one request whose next token is scored this step (echo with logprobs)."""

    request: Request
    rows: np.ndarray  # [m] indices into the step's flat tokens
    targets: list[int]  # [m] the prompt tokens those positions predict


@dataclass
class PromptLogprobs:
    request: Request
    logprobs: list[float]  # of each target token, in prompt order
    top_logprobs: list[TopLogprobs]  # per target, when the request asked for alternatives


@dataclass
class StepResult:
    logits: torch.Tensor  # [num_sampling, vocab] fp32
    sampling_requests: list[Request]  # requests whose known tokens are all computed after this step
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)


class ModelRunner:
    def __init__(self, backbone: Backbone, num_pages: int, page_size: int, lora_pool_rows: int,
                 vector_pool_rows: int, bottleneck_pool_rows: int):
        self.backbone = backbone
        self.page_size = page_size
        a = backbone.arch
        params = next(backbone.model.parameters())
        self.device, self.dtype = params.device, params.dtype
        # Stored [num_layers, 2 (k, v), Hkv, num_pages, page_size, D] and handed out as views of the
        # logical shape [num_layers, 2, num_pages, page_size, Hkv, D]: head-major storage lets the
        # CPU reference gather one contiguous run per (head, sequence); the Triton kernels read
        # any layout through strides. Zero-filled: masked slots are still multiplied by 0, and
        # uninitialised memory could hold NaN.
        storage = torch.zeros(a.num_layers, 2, a.num_kv_heads, num_pages, page_size, a.head_dim,
                              dtype=self.dtype, device=self.device)
        self.kv_cache = storage.permute(0, 1, 3, 4, 2, 5)  # [num_layers, 2, num_pages, page_size, Hkv, D]
        self.lora_pool = LoRAPool(a, lora_pool_rows, self.dtype, self.device)
        # CPU: decode groups' LoRA weights kept across steps instead of gathered every step, in at
        # most the pool's own budget again (the Triton kernels read the pool's rows in place).
        self.lora_stage = (LoRAStage(lora_pool_rows * bytes_per_row(a, self.dtype))
                           if self.device.type != "cuda" else None)
        self.vector_pool = VectorPool(a, vector_pool_rows, self.device)
        self.bottleneck_pool = BottleneckPool(a, bottleneck_pool_rows, self.dtype, self.device)
        # the pools whose adapters take several rows each: a waiting one may need others drained
        self.row_pools = {"lora": self.lora_pool, "bottleneck": self.bottleneck_pool}

    @staticmethod
    def bytes_per_page(backbone: Backbone, page_size: int, dtype: torch.dtype) -> int:
        a = backbone.arch
        return a.num_layers * 2 * page_size * a.num_kv_heads * a.head_dim * dtype.itemsize

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> StepResult:
        input_ids, positions, meta, lora, vectors, bottlenecks, logits_indices, sampling, scoring = self._prepare(step)
        model = self.backbone.model
        # [T, hidden]
        hidden = model(model.embed(input_ids), positions, meta, self.kv_cache, lora, vectors, bottlenecks)
        prompt_logprobs = [self._score_prompt(hidden, job) for job in scoring]
        return StepResult(model.compute_logits(hidden[logits_indices]), sampling, prompt_logprobs)

    def _score_prompt(self, hidden: torch.Tensor, job: PromptScoring) -> PromptLogprobs:
        """Log-probabilities of the prompt's own tokens from this step's hidden states: the prefill
        computes them anyway, so echo with logprobs costs the LM head on those rows, not a second pass."""
        k = job.request.params.prompt_logprobs
        logprobs, top = [], []
        for lo in range(0, len(job.rows), PROMPT_LOGPROBS_ROWS):
            rows = torch.from_numpy(job.rows[lo:lo + PROMPT_LOGPROBS_ROWS]).to(self.device)
            targets = torch.tensor(job.targets[lo:lo + PROMPT_LOGPROBS_ROWS], device=self.device)
            log_probs = torch.log_softmax(self.backbone.model.compute_logits(hidden[rows]).float(), -1)  # [m, V]
            logprobs += log_probs.gather(1, targets[:, None])[:, 0].tolist()
            if k:
                values, ids = torch.topk(log_probs, k, dim=-1)
                top += [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        return PromptLogprobs(job.request, logprobs, top)

    # ---- compiling task prefixes ---------------------------------------------------------------
    @torch.inference_mode()
    def write_prefix(self, keys: torch.Tensor, values: torch.Tensor, page_ids: list[int]) -> None:
        """keys, values: [num_layers, P, Hkv, D] as they sit in the cache (prefix tuning)."""
        slots = self._slots(page_ids, 0, keys.shape[1])
        for layer in range(keys.shape[0]):
            store_kv(keys[layer].to(self.device), values[layer].to(self.device),
                     self.kv_cache[layer, 0], self.kv_cache[layer, 1], slots)

    def prefill_embeddings(self, embeddings: torch.Tensor, page_ids: list[int]) -> None:
        """Run the backbone over a soft prompt [P, hidden] at positions 0..P-1, writing its K/V into
        page_ids. Attention is causal, so this KV is what every request of the task would compute."""
        self.prefill_embeddings_batch([(embeddings, page_ids)])

    @torch.inference_mode()
    def prefill_embeddings_batch(self, prompts: list[tuple[torch.Tensor, list[int]]]) -> None:
        """Several soft prompts ([P_i, hidden], their pages) in one forward, each its own sequence."""
        device = self.device
        lens = [e.shape[0] for e, _ in prompts]
        cu_seqlens = np.zeros(len(prompts) + 1, dtype=np.int32)
        np.cumsum(lens, out=cu_seqlens[1:])
        max_pages = max(len(pages) for _, pages in prompts)
        page_table = np.zeros((len(prompts), max_pages), dtype=np.int32)
        for i, (_, pages) in enumerate(prompts):
            page_table[i, :len(pages)] = pages
        meta = PagedAttentionMetadata(
            slot_mapping=torch.cat([self._slots(pages, 0, n) for (_, pages), n in zip(prompts, lens)]),
            cu_seqlens_q=torch.from_numpy(cu_seqlens).to(device),
            seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
            page_table=torch.from_numpy(page_table).to(device),
            prefix_lens=torch.zeros(len(prompts), dtype=torch.int32, device=device),
            prefix_page_table=torch.zeros(len(prompts), 0, dtype=torch.int32, device=device),
            max_query_len=max(lens), max_seq_len=max(lens), max_prefix_len=0,
        )
        positions = torch.cat([torch.arange(n, device=device) for n in lens])
        embeddings = torch.cat([e for e, _ in prompts]).to(device=device, dtype=self.dtype)
        self.backbone.model(embeddings, positions, meta, self.kv_cache)

    @torch.inference_mode()
    def prefix_is_finite(self, page_ids: list[int], num_tokens: int) -> bool:
        """Whether the first num_tokens slots of page_ids hold finite keys and values (a compiled prefix)."""
        pages = torch.tensor(page_ids, dtype=torch.long, device=self.device)
        kv = self.kv_cache[:, :, pages].flatten(2, 3)[:, :, :num_tokens]  # [num_layers, 2, num_tokens, Hkv, D]
        return bool(torch.isfinite(kv).all())

    @torch.inference_mode()
    def copy_slots(self, src_page: int, dst_page: int, num_slots: int) -> None:
        """Copy the first num_slots keys and values of a page into another (a forked choice's own copy)."""
        self.kv_cache[:, :, dst_page, :num_slots] = self.kv_cache[:, :, src_page, :num_slots]

    @torch.inference_mode()
    def clear_pages(self, page_ids: list[int]) -> None:
        pages = torch.tensor(page_ids, dtype=torch.long, device=self.device)
        self.kv_cache.index_fill_(2, pages, 0)

    def _slots(self, page_ids: list[int], start: int, end: int) -> torch.Tensor:
        pos = torch.arange(start, end)
        pages = torch.tensor(page_ids, dtype=torch.long)
        return (pages[pos // self.page_size] * self.page_size + pos % self.page_size).to(self.device)

    # ---- batch metadata ----------------------------------------------------------------------
    def _prepare(self, step: SchedulerOutput):
        page_size = self.page_size
        num_seqs = len(step.requests)
        token_chunks, position_chunks, slot_chunks, lora_chunks, bottleneck_chunks = [], [], [], [], []
        cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int32)
        seq_lens = np.zeros(num_seqs, dtype=np.int32)
        prefix_lens = np.zeros(num_seqs, dtype=np.int32)
        handles = [r.adapter for r in step.requests]
        max_pages = max(len(r.page_ids) for r in step.requests)
        max_prefix_pages = max((len(h.prefix_pages) for h in handles if h is not None), default=0)
        page_table = np.zeros((num_seqs, max_pages), dtype=np.int32)
        prefix_page_table = np.zeros((num_seqs, max_prefix_pages), dtype=np.int32)
        logits_indices, sampling, scoring = [], [], []
        lora_segment_of: dict[int, int] = {}
        bottleneck_segment_of: dict[int, int] = {}
        lora_segments: list[LoRAAllocation] = []
        bottleneck_segments: list[BottleneckAllocation] = []
        vector_tokens, vector_rows = [], []  # per sequence of a task with vectors: its token rows, its pool row
        for s, (request, n) in enumerate(zip(step.requests, step.num_new_tokens)):
            start = request.num_computed_tokens
            pages = np.asarray(request.page_ids, dtype=np.int64)
            pos = np.arange(start, start + n, dtype=np.int64)  # own positions (index into own pages)
            handle = handles[s]
            prefix_len = handle.prefix_len if handle is not None else 0
            token_chunks.append(request.token_ids[start:start + n])
            position_chunks.append(pos + prefix_len)  # real tokens start after the task's virtual tokens
            slot_chunks.append(pages[pos // page_size] * page_size + pos % page_size)
            lora_chunks.append(np.full(n, _segment(handle.lora if handle is not None else None, lora_segment_of,
                                                   lora_segments), dtype=np.int64))
            bottleneck_chunks.append(np.full(n, _segment(handle.bottleneck if handle is not None else None,
                                                         bottleneck_segment_of, bottleneck_segments), dtype=np.int64))
            if handle is not None and handle.vectors is not None:
                vector_tokens.append(np.arange(cu_seqlens[s], cu_seqlens[s] + n, dtype=np.int64))
                vector_rows.append(np.full(n, handle.vectors.row, dtype=np.int64))
            cu_seqlens[s + 1] = cu_seqlens[s] + n
            seq_lens[s] = start + n
            page_table[s, :len(pages)] = pages
            if prefix_len:
                prefix_lens[s] = prefix_len
                prefix_page_table[s, :len(handle.prefix_pages)] = handle.prefix_pages
            if start + n == request.num_tokens:
                logits_indices.append(cu_seqlens[s + 1] - 1)
                sampling.append(request)
            if request.prompt_logprobs_pending:
                # Position p predicts prompt token p + 1; positions scored before a preemption are not again.
                lo, hi = max(start, len(request.prompt_logprobs)), min(start + n, request.num_prompt_tokens - 1)
                if hi > lo:
                    rows = np.arange(lo, hi, dtype=np.int64) - start + cu_seqlens[s]
                    scoring.append(PromptScoring(request, rows, request.token_ids[lo + 1:hi + 1]))
        device = self.device
        meta = PagedAttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_chunks)).to(device),
            cu_seqlens_q=torch.from_numpy(cu_seqlens).to(device),
            seq_lens=torch.from_numpy(seq_lens).to(device),
            page_table=torch.from_numpy(page_table).to(device),
            prefix_lens=torch.from_numpy(prefix_lens).to(device),
            prefix_page_table=torch.from_numpy(prefix_page_table).to(device),
            max_query_len=max(step.num_new_tokens), max_seq_len=int(seq_lens.max()),
            max_prefix_len=int(prefix_lens.max()),
        )
        if device.type == "cuda" and meta.max_prefix_len:  # the torch reference has no cascade schedule
            meta.cascade = plan_cascade(cu_seqlens, seq_lens, page_table, prefix_lens, prefix_page_table, device)
        lora = None
        if lora_segments:  # plain and prompt-style batches skip every LoRA op
            lora_meta = lora_batch_metadata(np.concatenate(lora_chunks), [a.rows for a in lora_segments],
                                            [a.scaling for a in lora_segments], device)
            lora = LoRAStep(self.lora_pool.pools, lora_meta, stage=self.lora_stage,
                            serials=[a.serial for a in lora_segments])
        bottlenecks = None
        if bottleneck_segments:  # as LoRA: grouped by adapter, one plan shared by every layer
            bottleneck_meta = lora_batch_metadata(np.concatenate(bottleneck_chunks),
                                                  [a.rows for a in bottleneck_segments],
                                                  [1.0] * len(bottleneck_segments), device)
            bottlenecks = BottleneckStep(self.bottleneck_pool.pools, plan_bottleneck(
                bottleneck_meta, [a.activation for a in bottleneck_segments], [a.slot for a in bottleneck_segments]))
        vectors = None
        if vector_tokens:  # batches without such tasks skip every vector op
            vectors = VectorStep(self.vector_pool.pools, torch.from_numpy(np.concatenate(vector_tokens)).to(device),
                                 torch.from_numpy(np.concatenate(vector_rows)).to(device))
        input_ids = torch.tensor([t for chunk in token_chunks for t in chunk], dtype=torch.long, device=device)
        positions = torch.from_numpy(np.concatenate(position_chunks)).to(device)
        logits_indices = torch.tensor(logits_indices, dtype=torch.long, device=device)
        return input_ids, positions, meta, lora, vectors, bottlenecks, logits_indices, sampling, scoring


def _segment(allocation, segment_of: dict[int, int], segments: list) -> int:
    """The segment of a resident adapter's pool allocation in this step (-1 for None): one per
    allocation, shared by all its requests and choices, numbered in order of first appearance."""
    if allocation is None:
        return -1
    segment = segment_of.setdefault(id(allocation), len(segments))
    if segment == len(segments):
        segments.append(allocation)
    return segment
