"""merge_attn_states and cascade attention against their references, and the references against
dense attention."""

import pytest
import torch
from attention_cases import DEVICE, assert_close, make_batch, naive_attention

from prefixserve.kernels.cascade_attention import (
    cascade_attention,
    cascade_attention_reference,
    cascade_paged_attention,
)
from prefixserve.kernels.cascade_plan import plan_cascade, should_use_cascade
from prefixserve.kernels.merge_attn_states import merge_attn_states, merge_attn_states_reference

bf16_needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                                     reason="bf16 needs a CUDA GPU; the Triton interpreter rounds bf16 wrongly")
DTYPES = [torch.float32, torch.float16, pytest.param(torch.bfloat16, marks=bf16_needs_cuda)]
GQA = [(4, 4), (6, 2), (8, 1)]
# Sequences sorted by task, as cascade requires. Task 1 has no prefix (plain backbone requests).
CASCADE_CASES = {
    "decode_many_per_task": ([21, 0, 1, 40], [(0, 5, 1), (0, 17, 1), (0, 1, 1), (1, 9, 1), (2, 3, 1),
                                               (2, 30, 1), (3, 2, 1)]),
    "prefill_and_decode": ([35, 0], [(0, 12, 12), (0, 20, 1), (0, 9, 4), (1, 6, 6), (1, 17, 1)]),
}
SCALE = 0.41


def _partial(num_tokens, num_heads, head_dim, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    out = torch.randn(num_tokens, num_heads, head_dim, generator=gen).to(dtype)
    lse = torch.randn(num_tokens, num_heads, generator=gen) * 3
    return out.to(DEVICE), lse.to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
def test_merge_matches_reference_including_empty_sides(dtype):
    out_a, lse_a = _partial(7, 20, 32, dtype, 0)  # 20 heads: two head blocks, the second partial
    out_b, lse_b = _partial(7, 20, 32, dtype, 1)
    lse_a[0] = float("-inf")  # token 0: A saw no key
    lse_b[1] = float("-inf")  # token 1: B saw no key
    lse_a[2, :3] = lse_b[2, :3] = float("-inf")  # token 2, heads 0-2: neither did
    out, lse = merge_attn_states(out_a, lse_a, out_b, lse_b, return_lse=True)
    ref, ref_lse = merge_attn_states_reference(out_a, lse_a, out_b, lse_b, return_lse=True)
    assert_close(out, ref, dtype)
    assert_close(lse, ref_lse, torch.float32)
    assert_close(out[0], out_b[0], dtype)
    assert torch.all(out[2, :3] == 0) and torch.all(lse[2, :3] == float("-inf"))


def test_merge_reference_equals_attention_over_the_union_of_keys():
    # A sequence's keys split into its prefix (A) and own part (B): merging must give full attention.
    batch = make_batch([13], [(0, 10, 1), (0, 4, 1)], num_heads=4, num_kv_heads=2, head_dim=16)
    full, _ = naive_attention(batch, SCALE)
    parts = []
    for keep_prefix in (True, False):
        cut = make_batch([13], [(0, 10, 1), (0, 4, 1)], num_heads=4, num_kv_heads=2, head_dim=16)
        for s, (k, v) in enumerate(cut.dense_kv):
            sl = slice(0, 13) if keep_prefix else slice(13, None)
            cut.dense_kv[s] = (k[sl], v[sl])
            cut.prefix_lens[s] = 0  # naive attention then sees exactly this slice, all visible
            cut.seq_lens[s] = k[sl].shape[0]
        parts.append(naive_attention(cut, SCALE))
    merged = merge_attn_states_reference(parts[0][0], parts[0][1], parts[1][0], parts[1][1])
    assert_close(merged, full, torch.float32)


def _cascade_args(batch):
    return (batch.q, batch.k_cache, batch.v_cache, batch.cu_seqlens_q, batch.seq_lens, batch.page_table,
            batch.cu_seqs_per_task(), batch.task_prefix_lens, batch.task_prefix_page_table, SCALE)


@pytest.mark.parametrize("dtype", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("heads", GQA, ids=lambda h: f"gqa{h[0] // h[1]}")
@pytest.mark.parametrize("case", CASCADE_CASES)
def test_cascade_matches_reference(case, heads, dtype):
    batch = make_batch(*CASCADE_CASES[case], num_heads=heads[0], num_kv_heads=heads[1], head_dim=16, dtype=dtype)
    max_query_len = int((batch.cu_seqlens_q[1:] - batch.cu_seqlens_q[:-1]).max())
    out = cascade_attention(*_cascade_args(batch), max_query_len=max_query_len)
    assert out.dtype == dtype
    assert_close(out, cascade_attention_reference(*_cascade_args(batch)), dtype)


@pytest.mark.parametrize("case", CASCADE_CASES)
def test_cascade_reference_matches_dense_attention(case):
    batch = make_batch(*CASCADE_CASES[case], num_heads=6, num_kv_heads=2, head_dim=16, seed=6)
    assert_close(cascade_attention_reference(*_cascade_args(batch)), naive_attention(batch, SCALE)[0],
                 torch.float32)


def test_should_use_cascade_wants_long_prefixes_shared_by_many_sequences():
    assert should_use_cascade([64, 1], [512, 0])
    assert should_use_cascade([8, 8], [2048, 2048])
    assert not should_use_cascade([64], [16])  # short prefix: re-reading it is cheap
    assert not should_use_cascade([1] * 64, [2048] * 64)  # one sequence per task: nothing shared
    assert not should_use_cascade([], [])


def _host(batch):
    return [t.cpu().numpy() for t in (batch.cu_seqlens_q, batch.seq_lens, batch.page_table, batch.prefix_lens,
                                      batch.prefix_page_table)]


# Tasks interleaved as the scheduler leaves them; task 1 is plain (no prefix).
INTERLEAVED = ([20, 0, 33], [(2, 9, 1), (0, 5, 1), (1, 7, 7), (2, 30, 4), (0, 17, 1), (1, 3, 1), (2, 12, 1),
                             (0, 6, 6)])


def test_plan_sorts_sequences_by_task_prefix_in_order_of_first_appearance(monkeypatch):
    monkeypatch.setattr("prefixserve.kernels.cascade_plan.MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr("prefixserve.kernels.cascade_plan.MIN_PREFIX_LEN", 1)
    monkeypatch.setattr("prefixserve.kernels.cascade_plan.MIN_SEQS_PER_TASK", 2)
    batch = make_batch(*INTERLEAVED, num_heads=4, num_kv_heads=2, head_dim=16)
    plan = plan_cascade(*_host(batch), "cpu")
    order = [0, 3, 6, 1, 4, 7, 2, 5]  # task 2's sequences, then task 0's, then the plain ones
    assert plan.cu_seqs_per_task.tolist() == [0, 3, 6, 8]
    assert plan.task_prefix_lens.tolist() == [33, 20, 0]
    assert plan.seq_lens.tolist() == [batch.seq_lens[s].item() for s in order]
    cu = batch.cu_seqlens_q.tolist()
    assert plan.token_order.tolist() == [t for s in order for t in range(cu[s], cu[s + 1])]
    assert plan.max_tokens_per_task == 8 and plan.max_query_len == 7  # task 0: 1 + 1 + 6 query rows


def test_plan_is_none_unless_the_shared_prefix_traffic_pays():
    few = make_batch([200], [(0, 3, 1)] * 3, num_heads=4, num_kv_heads=2, head_dim=16)
    assert plan_cascade(*_host(few), "cpu") is None  # 3 sequences on the prefix: below MIN_SEQS_PER_TASK
    many = make_batch([1100, 0], [(0, 3, 1)] * 5 + [(1, 4, 1)], num_heads=4, num_kv_heads=2, head_dim=16)
    assert plan_cascade(*_host(many), "cpu") is not None  # 4 re-reads of 1100 tokens saved


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_cascade_in_batch_order_matches_mixed_prefix_attention(monkeypatch, dtype):
    """What the engine dispatches on CUDA: a batch in the scheduler's order, regrouped by the plan."""
    monkeypatch.setattr("prefixserve.kernels.cascade_plan.MIN_SAVED_TOKENS", 1)
    monkeypatch.setattr("prefixserve.kernels.cascade_plan.MIN_PREFIX_LEN", 1)
    monkeypatch.setattr("prefixserve.kernels.cascade_plan.MIN_SEQS_PER_TASK", 2)
    batch = make_batch(*INTERLEAVED, num_heads=6, num_kv_heads=2, head_dim=16, dtype=dtype, seed=3)
    plan = plan_cascade(*_host(batch), DEVICE)
    out = cascade_paged_attention(batch.q, batch.k_cache, batch.v_cache, plan, SCALE)
    assert_close(out, naive_attention(batch, SCALE)[0], dtype)
