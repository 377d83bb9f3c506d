"""The frozen backbone steered by an arbitrary soft prompt (or a prefix), exactly as the engine serves one.

The engine runs a soft prompt ([P, hidden] embeddings: a `prompt` artifact, or decoder(z) of an
`intrinsic` one) through the backbone as positions 0..P-1 and starts the request's own tokens at
position P. `soft_prompt_loss` (training) and `greedy_with_soft_prompt` (evaluation) lay sequences
out the same way, so what a trainer measures is what a tenant will get.

Layout of one padded row: [P soft-prompt vectors][real tokens][right pad] for the loss, and
[P soft-prompt vectors][left pad][prompt tokens] for decoding (so every row's next token is at the
last column). Padding is masked out and never shifts a real token's position. A prefix-tuning prefix
(`greedy_with_prefix`) is P keys and values per layer in the cache instead, with the same positions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from prefixserve.training.hf_cache import cache_kwarg

if TYPE_CHECKING:
    from prefixserve.training.data import EncodedExample

IGNORE = -100


def _expand(soft_prompt: torch.Tensor, batch_size: int, dtype: torch.dtype) -> torch.Tensor:
    """[P, hidden] or [B, P, hidden] -> [B, P, hidden] in the backbone's dtype (keeps the autograd graph)."""
    if soft_prompt.dim() == 2:
        soft_prompt = soft_prompt.unsqueeze(0).expand(batch_size, -1, -1)
    if soft_prompt.dim() != 3 or soft_prompt.shape[0] != batch_size:
        raise ValueError(f"expected a soft prompt [P, hidden] or [{batch_size}, P, hidden], "
                         f"found {list(soft_prompt.shape)}")
    return soft_prompt.to(dtype)


def soft_prompt_loss(model, soft_prompt: torch.Tensor, batch: Sequence[EncodedExample],
                     per_example: bool = False) -> torch.Tensor:
    """Mean cross-entropy over the output tokens of `batch`, with `soft_prompt` in front of each
    example (prompt_ids + output_ids at positions P, P+1, ...). Gradients flow into the soft prompt;
    the backbone is whatever the caller froze. per_example: [B] losses (each a mean over its tokens)."""
    device = model.get_input_embeddings().weight.device
    lengths = [len(ex.prompt_ids) + len(ex.output_ids) for ex in batch]
    num_cols = max(lengths)
    ids = torch.zeros((len(batch), num_cols), dtype=torch.long)  # [B, T]; padding is masked, any id works
    labels = torch.full((len(batch), num_cols), IGNORE, dtype=torch.long)  # [B, T]
    for row, ex in enumerate(batch):
        tokens = list(ex.prompt_ids) + list(ex.output_ids)
        ids[row, :len(tokens)] = torch.tensor(tokens)
        labels[row, len(ex.prompt_ids):len(tokens)] = torch.tensor(list(ex.output_ids))
    ids, labels = ids.to(device), labels.to(device)
    mask = (torch.arange(num_cols).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)).to(device)  # [B, T]

    embeds = model.get_input_embeddings()(ids)  # [B, T, hidden]
    prompt = _expand(soft_prompt.to(device), len(batch), embeds.dtype)  # [B, P, hidden]
    num_virtual = prompt.shape[1]
    inputs = torch.cat([prompt, embeds], dim=1)  # [B, P+T, hidden]
    attention = torch.cat([torch.ones(len(batch), num_virtual, dtype=torch.bool, device=device), mask], dim=1)
    positions = torch.arange(num_virtual + num_cols, device=device).unsqueeze(0).expand(len(batch), -1)
    hidden = model.model(inputs_embeds=inputs, attention_mask=attention.long(), position_ids=positions,
                         use_cache=False).last_hidden_state  # [B, P+T, hidden]
    # Column P-1+t predicts token t; project only the columns whose target is an output token (the
    # vocab projection over every column would cost as much as a fifth of the backbone on SmolLM2).
    hidden = hidden[:, num_virtual - 1:-1]  # [B, T, hidden]
    targets = labels != IGNORE  # [B, T]
    logits = model.lm_head(hidden[targets]).float()  # [N, vocab]
    token_loss = F.cross_entropy(logits, labels[targets], reduction="none")  # [N]
    if not per_example:
        return token_loss.mean()
    rows = targets.nonzero()[:, 0]  # [N] example index of each target token
    sums = torch.zeros(len(batch), device=device).index_add(0, rows, token_loss)
    return sums / targets.sum(1).clamp(min=1)  # [B]


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids [B, T] left-padded with pad_id, real [B, T] True on prompt tokens): every row's next token
    is then predicted at the last column."""
    lengths, num_cols = [len(p) for p in prompts], max(len(p) for p in prompts)
    ids = torch.full((len(prompts), num_cols), pad_id, dtype=torch.long)  # [B, T]
    for row, p in enumerate(prompts):
        ids[row, num_cols - len(p):] = torch.tensor(p, dtype=torch.long)
    real = torch.arange(num_cols).unsqueeze(0) >= num_cols - torch.tensor(lengths).unsqueeze(1)  # [B, T]
    return ids.to(device), real.to(device)


def _behind_virtual(real: torch.Tensor, num_virtual: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention [B, P+T] with the P virtual positions attended, positions [B, T] of the real tokens):
    real tokens sit at P..P+len-1 whatever the padding; pad columns get any position (they are masked)."""
    batch_size = real.shape[0]
    attention = torch.cat([torch.ones(batch_size, num_virtual, dtype=torch.long, device=real.device), real.long()], 1)
    positions = (num_virtual + real.long().cumsum(1) - 1).clamp(min=num_virtual)  # [B, T]
    return attention, positions


@torch.no_grad()
def greedy_with_soft_prompt(model, soft_prompt: torch.Tensor, prompts: list[list[int]], max_new_tokens: int,
                            eos_ids: Sequence[int], pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of each prompt behind the soft prompt ([P, hidden] shared, or
    [len(prompts), P, hidden] one per prompt). A row stops after emitting a token in `eos_ids`
    (which it keeps, as the engine does) or after max_new_tokens. Padding is masked: any pad_id works."""
    device = model.get_input_embeddings().weight.device
    ids, real = _left_padded(prompts, pad_id, device)  # [B, T]
    embeds = model.get_input_embeddings()(ids)  # [B, T, hidden]
    prompt = _expand(soft_prompt.to(device), len(prompts), embeds.dtype)  # [B, P, hidden]
    num_virtual = prompt.shape[1]
    attention, token_positions = _behind_virtual(real, num_virtual)
    positions = torch.cat([torch.arange(num_virtual, device=device).expand(len(prompts), -1), token_positions], 1)
    cache = DynamicCache()
    out = model(inputs_embeds=torch.cat([prompt, embeds], 1), attention_mask=attention, position_ids=positions,
                use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    return _greedy_continue(model, out.logits, cache, attention, token_positions[:, -1] + 1, max_new_tokens, eos_ids)


@torch.no_grad()
def greedy_with_prefix(model, prefix_cache, num_virtual: int, prompts: list[list[int]], max_new_tokens: int,
                       eos_ids: Sequence[int], pad_id: int = 0) -> list[list[int]]:
    """Greedy continuation of each prompt behind a prefix-tuning prefix: `prefix_cache` is a transformers
    Cache already holding the P virtual keys and values of every row (what peft's `get_prompt` makes),
    and is extended in place. The prompt's tokens sit at P, P+1, ..., as the engine serves them."""
    device = model.get_input_embeddings().weight.device
    ids, real = _left_padded(prompts, pad_id, device)  # [B, T]
    attention, positions = _behind_virtual(real, num_virtual)
    out = model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True, logits_to_keep=1,
                **{cache_kwarg(model): prefix_cache})
    return _greedy_continue(model, out.logits, prefix_cache, attention, positions[:, -1] + 1, max_new_tokens,
                            eos_ids)


def _greedy_continue(model, logits: torch.Tensor, cache, attention: torch.Tensor, next_positions: torch.Tensor,
                     max_new_tokens: int, eos_ids: Sequence[int]) -> list[list[int]]:
    """Decode from the prompt's last logits [B, 1, V] one token a step through `cache`; `attention` [B, S]
    covers what the cache holds, `next_positions` [B] is each row's next position."""
    batch_size, device = logits.shape[0], logits.device
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    outputs: list[list[int]] = [[] for _ in range(batch_size)]
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    kwarg = cache_kwarg(model)
    for step in range(max_new_tokens):
        tokens = logits[:, -1].argmax(-1)  # [B]
        for row in (~done).nonzero()[:, 0].tolist():
            outputs[row].append(int(tokens[row]))
        done |= torch.isin(tokens, eos)
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        attention = torch.cat([attention, torch.ones(batch_size, 1, dtype=torch.long, device=device)], 1)
        logits = model(input_ids=tokens.unsqueeze(1), attention_mask=attention,
                       position_ids=next_positions.unsqueeze(1), use_cache=True, **{kwarg: cache}).logits
        next_positions = next_positions + 1
    return outputs


def decode_answer(tokenizer, token_ids: Sequence[int], eos_ids: Sequence[int]) -> str:
    """The answer text of generated ids: cut at the first EOS, special tokens dropped, stripped."""
    ids = list(token_ids)
    for i, token in enumerate(ids):
        if token in eos_ids:
            ids = ids[:i]
            break
    return tokenizer.decode(ids, skip_special_tokens=True).strip()


def exact_match(tokenizer, predictions: Sequence[Sequence[int]], examples: Sequence[EncodedExample],
                eos_ids: Sequence[int]) -> float:
    """Fraction of examples whose greedy answer equals their output text (both stripped)."""
    if not examples:
        return 0.0
    hits = sum(decode_answer(tokenizer, p, eos_ids) == ex.output_text.strip() for p, ex in zip(predictions, examples))
    return hits / len(examples)


def evaluate_soft_prompt(model, tokenizer, soft_prompt: torch.Tensor, examples: Sequence[EncodedExample],
                         max_new_tokens: int, eos_ids: Sequence[int], batch_size: int = 16) -> dict[str, float]:
    """{"exact_match", "eval_loss"} of a [P, hidden] soft prompt on `examples` (greedy, batched); eval_loss
    is the mean NLL per output token (EOS included), as `evaluate.evaluate` reports it for peft models."""
    if not examples:
        return {"exact_match": 0.0, "eval_loss": float("nan")}
    hits, nll, num_tokens = 0.0, 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        chunk_tokens = sum(len(ex.output_ids) for ex in chunk)
        with torch.no_grad():
            nll += float(soft_prompt_loss(model, soft_prompt, chunk)) * chunk_tokens
        num_tokens += chunk_tokens
        predictions = greedy_with_soft_prompt(model, soft_prompt, [list(ex.prompt_ids) for ex in chunk],
                                              max_new_tokens, eos_ids)
        hits += exact_match(tokenizer, predictions, chunk, eos_ids) * len(chunk)
    return {"exact_match": hits / len(examples), "eval_loss": nll / num_tokens}
