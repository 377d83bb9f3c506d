"""Greedy evaluation of a (peft-wrapped) backbone on encoded examples: the job's reported metrics.

Predictions are what the serving engine generates for the same adapter: fp32, greedy, the same
prompt token ids, stopping at the backbone's EOS tokens. Prompts are batched only with prompts of
the same length, so no sequence is padded and every prompt token sits at the position the engine
gives it (P + i behind a soft prompt or prefix of P virtual tokens).

peft's prompt-learning kinds are decoded here from their virtual tokens (`PeftModel.get_prompt`)
through the backbone's own forward, not through `PeftModel.generate`: with transformers 5.24 and
peft 0.21 that generate silently dropped prefixes and soft prompts, and metrics scored the bare
backbone. LoRA and IA3 live inside the backbone's layers, and BitFit's biases in forward hooks on them
(training/bitfit.py), so the backbone's `generate` serves them as is.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from prefixserve.training.data import IGNORE_INDEX, EncodedExample, collate
from prefixserve.training.soft_prompt import greedy_with_prefix, greedy_with_soft_prompt

MAX_EVAL_BATCH = 32


@torch.no_grad()
def predict_ids(model, examples: list[EncodedExample], max_new_tokens: int, eos_token_ids: frozenset[int],
                pad_id: int = 0) -> list[list[int]]:
    """Greedy output token ids per example, up to (not including) the first EOS."""
    by_length: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        by_length[len(e.prompt_ids)].append(i)
    outputs: list[list[int]] = [[] for _ in examples]
    eos = sorted(eos_token_ids)
    for _, indices in sorted(by_length.items()):
        for start in range(0, len(indices), MAX_EVAL_BATCH):
            chunk = indices[start:start + MAX_EVAL_BATCH]
            prompts = [examples[i].prompt_ids for i in chunk]
            for i, row in zip(chunk, _greedy(model, prompts, max_new_tokens, eos, pad_id)):
                cut = next((k for k, t in enumerate(row) if t in eos_token_ids), len(row))
                outputs[i] = row[:cut]
    return outputs


def _greedy(model, prompts: list[list[int]], max_new_tokens: int, eos: list[int], pad_id: int) -> list[list[int]]:
    """Greedy new token ids of equal-length prompts (EOS included where one was emitted)."""
    device = model.get_input_embeddings().weight.device
    config = _prompt_learning_config(model)
    if config is not None:
        base, virtual = model.get_base_model(), model.get_prompt(batch_size=len(prompts))
        if config.peft_type == "PREFIX_TUNING":  # a Cache of P keys and values per layer
            return greedy_with_prefix(base, virtual, config.num_virtual_tokens, prompts, max_new_tokens, eos, pad_id)
        return greedy_with_soft_prompt(base, virtual, prompts, max_new_tokens, eos, pad_id)  # virtual [B, P, hidden]
    input_ids = torch.tensor(prompts, device=device)  # [B, L]
    generated = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                               max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos,
                               pad_token_id=pad_id)  # [B, L + new]
    return generated[:, input_ids.shape[1]:].tolist()


def _prompt_learning_config(model):
    """The active peft config of a prompt-learning PeftModel (prefix, prompt, P-tuning), else None."""
    configs = getattr(model, "peft_config", None)
    if not configs:
        return None
    config = configs[model.active_adapter]
    return config if config.is_prompt_learning else None


def predict(model, tokenizer, examples: list[EncodedExample], max_new_tokens: int,
            eos_token_ids: frozenset[int] | None = None, stop: str | None = None) -> list[str]:
    """Greedy output texts (special tokens skipped, as the engine's detokenizer does), cut before the
    first `stop` that follows some text: kinder to the baselines than a server stop string, which
    would end " \nyes" before the answer."""
    eos = eos_token_ids or frozenset({tokenizer.eos_token_id})
    ids = predict_ids(model, examples, max_new_tokens, eos, _pad_id(tokenizer))
    texts = [tokenizer.decode(row, skip_special_tokens=True) for row in ids]
    return [_cut(text, stop) for text in texts] if stop else texts


def _cut(text: str, stop: str) -> str:
    start = len(text) - len(text.lstrip())
    at = text.find(stop, start)
    return text if at < 0 else text[:at]


def output_nll(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(sum of NLL over the batch's output tokens, their number). Rows are right-padded, so every output
    token is predicted from one of the last `num_kept` positions; only those get logits (the LM head
    over a 49k vocabulary is a fifth of a small model's forward). peft's prompt kinds put virtual
    tokens in front, which changes nothing at the end of the rows."""
    device = model.get_input_embeddings().weight.device
    input_ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)  # [B, T]
    has_output = (labels != IGNORE_INDEX).any(dim=0)  # [T]
    first_output = int(has_output.nonzero()[0])  # first column holding an output token
    num_kept = input_ids.shape[1] - first_output + 1  # predictions of columns first_output..T-1
    logits = model(input_ids=input_ids, attention_mask=batch["attention_mask"].to(device),
                   logits_to_keep=num_kept).logits  # [B, num_kept, V]
    logits = logits[:, :-1]  # [B, num_kept-1, V]: kept position t predicts column t+1
    targets = labels[:, first_output:]  # [B, num_kept-1]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                          ignore_index=IGNORE_INDEX, reduction="sum")
    return nll, int((targets != IGNORE_INDEX).sum())


@torch.no_grad()
def mean_output_nll(model, examples: list[EncodedExample], pad_id: int) -> float:
    total, count = 0.0, 0
    for start in range(0, len(examples), MAX_EVAL_BATCH):
        nll, num_tokens = output_nll(model, collate(examples[start:start + MAX_EVAL_BATCH], pad_id))
        total, count = total + nll.item(), count + num_tokens
    return total / count


def evaluate(model, tokenizer, examples: list[EncodedExample], max_new_tokens: int,
             labels: tuple[str, ...] | None, eos_token_ids: frozenset[int] | None = None,
             stop: str | None = None) -> dict[str, float]:
    """exact_match (greedy text, stripped, == the reference, stripped), label_accuracy for classification
    tasks (the same, ignoring case and trailing punctuation, so "Positive." counts as a zero-shot
    answer), and eval_loss (mean NLL per output token, EOS included). Predictions are cut at `stop`
    (`predict`). {} for no examples."""
    if not examples:
        return {}
    predictions = predict(model, tokenizer, examples, max_new_tokens, eos_token_ids, stop)
    references = [e.output_text for e in examples]
    metrics = {"exact_match": _mean(p.strip() == r.strip() for p, r in zip(predictions, references)),
               "eval_loss": mean_output_nll(model, examples, _pad_id(tokenizer)),
               "num_eval": float(len(examples))}
    if labels:
        metrics["label_accuracy"] = _mean(_label(p) == _label(r) for p, r in zip(predictions, references))
    return metrics


def _label(text: str) -> str:
    return text.strip().rstrip(".!").strip().lower()


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
