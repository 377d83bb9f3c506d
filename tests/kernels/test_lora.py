"""Batched LoRA shrink/expand against the torch references, and the references against a plain
per-token computation with each adapter's true (unpadded) rank."""

import pytest
import torch
from attention_cases import DEVICE, TOLERANCES

from prefixserve.kernels.lora import (
    LoRABatchMetadata,
    add_lora,
    lora_batch_metadata,
    lora_expand,
    lora_expand_reference,
    lora_shrink,
    lora_shrink_reference,
)

bf16_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                     reason="bf16 needs a CUDA GPU; the Triton interpreter rounds bf16 wrongly")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_cuda)]
IN_FEATURES, OUT_FEATURES = 72, 40  # not multiples of the kernel tiles


def _adapters(ranks: list[int], max_rank: int, dtype, seed=0):
    """Stacked slots, each zero-padded past its own rank."""
    gen = torch.Generator().manual_seed(seed)
    lora_a = torch.zeros(len(ranks), max_rank, IN_FEATURES)
    lora_b = torch.zeros(len(ranks), OUT_FEATURES, max_rank)
    for slot, r in enumerate(ranks):
        lora_a[slot, :r] = torch.randn(r, IN_FEATURES, generator=gen) / 4
        lora_b[slot, :, :r] = torch.randn(OUT_FEATURES, r, generator=gen) / 4
    scaling = torch.rand(len(ranks), generator=gen) + 0.5
    return lora_a.to(dtype).to(DEVICE), lora_b.to(dtype).to(DEVICE), scaling.to(DEVICE)


def _tokens(token_slots: list[int], dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(len(token_slots), IN_FEATURES, generator=gen).to(dtype).to(DEVICE)
    y = torch.randn(len(token_slots), OUT_FEATURES, generator=gen).to(dtype).to(DEVICE)
    return x, y


def _with_empty_segment(meta: LoRABatchMetadata) -> LoRABatchMetadata:
    """Append a segment for a resident slot that has no tokens this step."""

    def cat(t, v):
        return torch.cat([t, torch.tensor([v], dtype=t.dtype, device=t.device)])

    return LoRABatchMetadata(meta.token_indices, cat(meta.num_tokens_per_slot, 0),
                             cat(meta.slot_start_offsets, len(meta.token_indices)), cat(meta.slot_ids, 2),
                             meta.max_tokens_per_slot)


TOKEN_SLOTS = {
    "decode_one_token_per_slot": [3, 0, -1, 1],
    "prefill_mixed_with_no_lora": [0, 0, 1, -1, 3, 3, 3, 0, -1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 3],
    "all_no_lora": [-1, -1, -1],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("max_rank", [8, 16])
@pytest.mark.parametrize("case", TOKEN_SLOTS)
def test_lora_matches_reference(case, max_rank, dtype):
    lora_a, lora_b, scaling = _adapters([max_rank, 3, max_rank, 1], max_rank, dtype)  # slot 2 stays empty
    x, y = _tokens(TOKEN_SLOTS[case], dtype)
    meta = _with_empty_segment(lora_batch_metadata(torch.tensor(TOKEN_SLOTS[case], device=DEVICE)))
    h_ref = lora_shrink_reference(x, lora_a, meta)
    y_ref = y.clone()
    lora_expand_reference(h_ref, lora_b, y_ref, scaling, meta)
    tol = TOLERANCES[dtype]
    for split_k in (1, 3):  # 3 splits of in_features meet through atomic adds
        h = lora_shrink(x, lora_a, meta, split_k=split_k)
        torch.testing.assert_close(h, h_ref, atol=tol, rtol=tol)
        y_out = y.clone()
        lora_expand(h, lora_b, y_out, scaling, meta)
        torch.testing.assert_close(y_out.float(), y_ref.float(), atol=tol, rtol=tol)
    no_lora = torch.tensor(TOKEN_SLOTS[case], device=DEVICE) < 0
    assert torch.equal(y_out[no_lora], y[no_lora])  # slot -1 rows untouched


@pytest.mark.parametrize("case", TOKEN_SLOTS)
def test_lora_references_match_per_token_computation(case):
    ranks = [16, 3, 16, 1]
    lora_a, lora_b, scaling = _adapters(ranks, 16, torch.float32)
    x, y = _tokens(TOKEN_SLOTS[case], torch.float32)
    expected = y.clone()
    for t, slot in enumerate(TOKEN_SLOTS[case]):
        if slot >= 0:
            r = ranks[slot]
            expected[t] += scaling[slot] * (lora_b[slot, :, :r] @ (lora_a[slot, :r] @ x[t]))
    add_lora(x, y, lora_a, lora_b, scaling, lora_batch_metadata(torch.tensor(TOKEN_SLOTS[case], device=DEVICE)))
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)


def test_lora_batch_metadata_groups_tokens_by_slot():
    meta = lora_batch_metadata(torch.tensor([2, -1, 0, 2, 0, 2]))
    assert meta.slot_ids.tolist() == [-1, 0, 2]
    assert meta.num_tokens_per_slot.tolist() == [1, 2, 3]
    assert meta.slot_start_offsets.tolist() == [0, 1, 3]
    assert meta.token_indices.tolist() == [1, 2, 4, 0, 3, 5]
    assert meta.max_tokens_per_slot == 3


def test_lora_rejects_mismatched_inputs_with_expected_and_found():
    lora_a, lora_b, scaling = _adapters([4], 4, torch.float32)
    x, y = _tokens([0, 0], torch.float32)
    meta = lora_batch_metadata(torch.tensor([0, 0], device=DEVICE))
    with pytest.raises(ValueError, match="expected x and lora_a of one dtype.*found torch.float16 and torch.float32"):
        lora_shrink(x.half(), lora_a, meta)
    with pytest.raises(ValueError, match=r"expected x \[num_tokens, 72\].*found x \(2, 71\)"):
        lora_shrink(x[:, :71], lora_a, meta)
    with pytest.raises(ValueError, match=r"expected scaling fp32 \[1\]"):
        lora_expand(torch.zeros(2, 4, device=DEVICE), lora_b, y, scaling.double(), meta)


def test_host_segment_path_matches_the_reference():
    """The engine's CPU path (per-adapter segments at each adapter's real rank) against the
    reference over the padded stacks; slot 1 is left out of the segments as an adapter without
    this target, so its tokens must stay untouched."""
    from prefixserve.kernels.lora import LoRASegment, add_lora_segments

    ranks = [3, 5, 8]
    lora_a, lora_b, scaling = _adapters(ranks, max_rank=8, dtype=torch.float32)
    lora_a, lora_b, scaling = lora_a.cpu(), lora_b.cpu(), scaling.cpu()
    token_slots = [2, -1, 0, 2, 1, 0, -1, 2]
    x, y = _tokens(token_slots, torch.float32)
    x, y = x.cpu(), y.cpu()
    slots = torch.tensor(token_slots)
    segments = [LoRASegment(torch.nonzero(slots == s)[:, 0], s, ranks[s], float(scaling[s])) for s in (0, 2)]
    ours = y.clone()
    add_lora_segments(x, ours, lora_a, lora_b, segments)
    without_slot_1 = torch.where(slots == 1, -1, slots)
    expected = y.clone()
    meta = lora_batch_metadata(without_slot_1)
    lora_expand_reference(lora_shrink_reference(x, lora_a, meta), lora_b, expected, scaling, meta)
    assert torch.allclose(ours, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(ours[slots < 0], y[slots < 0]) and torch.equal(ours[slots == 1], y[slots == 1])
    assert not torch.allclose(ours[slots == 2], y[slots == 2])
