"""Owns the KV pool tensor; turns a SchedulerOutput into flat varlen batch metadata and runs the
backbone. Only the rows that will be sampled reach the LM head."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from prefixserve.engine.request import Request
from prefixserve.engine.scheduler import SchedulerOutput
from prefixserve.kernels.paged_attention import PagedAttentionMetadata
from prefixserve.models.loader import Backbone


@dataclass
class StepResult:
    logits: torch.Tensor  # [num_sampling, vocab] fp32
    sampling_requests: list[Request]  # requests whose known tokens are all computed after this step


class ModelRunner:
    def __init__(self, backbone: Backbone, num_pages: int, page_size: int):
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

    @staticmethod
    def bytes_per_page(backbone: Backbone, page_size: int, dtype: torch.dtype) -> int:
        a = backbone.arch
        return a.num_layers * 2 * page_size * a.num_kv_heads * a.head_dim * dtype.itemsize

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> StepResult:
        input_ids, positions, meta, logits_indices, sampling = self._prepare(step)
        model = self.backbone.model
        hidden = model(model.embed(input_ids), positions, meta, self.kv_cache)  # [T, hidden]
        return StepResult(model.compute_logits(hidden[logits_indices]), sampling)

    def _prepare(self, step: SchedulerOutput):
        page_size = self.page_size
        num_seqs = len(step.requests)
        token_chunks, position_chunks, slot_chunks = [], [], []
        cu_seqlens = np.zeros(num_seqs + 1, dtype=np.int32)
        seq_lens = np.zeros(num_seqs, dtype=np.int32)
        max_pages = max(len(r.page_ids) for r in step.requests)
        page_table = np.zeros((num_seqs, max_pages), dtype=np.int32)
        logits_indices, sampling = [], []
        for s, (request, n) in enumerate(zip(step.requests, step.num_new_tokens)):
            start = request.num_computed_tokens
            pages = np.asarray(request.page_ids, dtype=np.int64)
            pos = np.arange(start, start + n, dtype=np.int64)
            token_chunks.append(request.token_ids[start:start + n])
            position_chunks.append(pos)
            slot_chunks.append(pages[pos // page_size] * page_size + pos % page_size)
            cu_seqlens[s + 1] = cu_seqlens[s] + n
            seq_lens[s] = start + n
            page_table[s, :len(pages)] = pages
            if start + n == request.num_tokens:
                logits_indices.append(cu_seqlens[s + 1] - 1)
                sampling.append(request)
        device = self.device
        meta = PagedAttentionMetadata(
            slot_mapping=torch.from_numpy(np.concatenate(slot_chunks)).to(device),
            cu_seqlens_q=torch.from_numpy(cu_seqlens).to(device),
            seq_lens=torch.from_numpy(seq_lens).to(device),
            page_table=torch.from_numpy(page_table).to(device),
            prefix_lens=torch.zeros(num_seqs, dtype=torch.int32, device=device),
            prefix_page_table=torch.zeros(num_seqs, 0, dtype=torch.int32, device=device),
            max_query_len=max(step.num_new_tokens), max_seq_len=int(seq_lens.max()), max_prefix_len=0,
        )
        input_ids = torch.tensor([t for chunk in token_chunks for t in chunk], dtype=torch.long, device=device)
        positions = torch.from_numpy(np.concatenate(position_chunks)).to(device)
        return input_ids, positions, meta, torch.tensor(logits_indices, dtype=torch.long, device=device), sampling
