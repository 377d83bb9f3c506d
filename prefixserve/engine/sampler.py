"""Per-request sampling in a mixed batch: greedy rows by one argmax, the rest by temperature,
top-k and top-p, each drawn with the request's own generator (so a seed reproduces its tokens
whatever else is in the batch).

Before choosing, each row's logits go through what its request asked for, in vLLM's order: the
grammar's token mask (structured outputs), min_tokens, logit_bias, then the repetition, frequency
and presence penalties. Each stage touches only the rows that use it, so plain rows pay one check
per stage. Logprobs are always those of the model's own distribution (the raw logits), as vLLM's
default: a penalty or bias changes what is chosen, not what the model thought of it."""

from __future__ import annotations

from typing import NamedTuple

import torch

from prefixserve.engine.request import Request, TopLogprobs
from prefixserve.engine.structured import apply_grammar_masks


class SampleResult(NamedTuple):
    tokens: list[int]
    logprobs: list[float] | None  # the chosen tokens', when any request asked
    top_logprobs: list[TopLogprobs] | None  # per row (empty for rows that did not ask), when any asked


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        """logits: [N, vocab] fp32, one row per request."""
        raw = logits
        logits = apply_grammar_masks(logits, [r.grammar for r in requests])
        logits = self._mask_min_tokens(logits, requests, copied=logits is not raw)
        logits = self._apply_bias_and_penalties(logits, requests, copied=logits is not raw)
        tokens = logits.argmax(-1)  # [N]
        for i, request in enumerate(requests):
            if not request.params.greedy:
                tokens[i] = self._sample_row(logits[i], request)  # a CPU int, written into the device tensor
        logprobs = top = None
        want_top = max((r.params.top_logprobs for r in requests), default=0)
        if want_top or any(r.params.logprobs for r in requests):
            log_probs = torch.log_softmax(raw, -1)  # [N, vocab]
            logprobs = log_probs.gather(1, tokens[:, None])[:, 0].tolist()
            if want_top:
                top = top_k_logprobs(log_probs, [r.params.top_logprobs for r in requests])
        return SampleResult(tokens.tolist(), logprobs, top)

    def _mask_min_tokens(self, logits: torch.Tensor, requests: list[Request], copied: bool) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.num_output_tokens < r.params.min_tokens]
        if not rows:
            return logits
        logits = logits if copied else logits.clone()
        for i in rows:
            params = requests[i].params
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            logits[i, list(banned)] = float("-inf")
        return logits

    @staticmethod
    def _apply_bias_and_penalties(logits: torch.Tensor, requests: list[Request], copied: bool) -> torch.Tensor:
        biased = [i for i, r in enumerate(requests) if r.params.logit_bias]
        penalized = [i for i, r in enumerate(requests) if r.params.penalized]
        if not biased and not penalized:
            return logits
        logits = logits if copied else logits.clone()
        for i in biased:
            ids, biases = zip(*requests[i].params.logit_bias)
            logits[i, list(ids)] += torch.tensor(biases, dtype=logits.dtype, device=logits.device)
        if penalized:
            apply_penalties(logits, [requests[i] for i in penalized], penalized)
        return logits

    @staticmethod
    def _sample_row(row: torch.Tensor, request: Request) -> int:
        params = request.params
        # Requests own CPU generators (seeded streams independent of the device), so one row of
        # logits travels to the host: 4 bytes x vocab, noise next to a forward step.
        row = row.float().cpu() / params.temperature  # [vocab]
        if params.top_k > 0 and params.top_k < row.shape[0]:
            kth = torch.topk(row, params.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if params.top_p < 1.0:
            sorted_logits, order = row.sort(descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop tokens once the mass before them already reaches top_p (the top token always stays).
            drop = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
            drop[0] = False  # a top_p that rounds to 0 in fp32 would otherwise drop every token
            row = row.scatter(0, order[drop], float("-inf"))
        probs = row.softmax(-1)
        return int(torch.multinomial(probs, 1, generator=request.generator))


def apply_penalties(logits: torch.Tensor, requests: list[Request], rows: list[int] | None = None) -> torch.Tensor:
    """logits: [N, vocab], changed in place and returned; requests[i] owns row rows[i] (row i by default).
    As vLLM: the repetition penalty covers prompt and output tokens (positive logits divided by it,
    negative ones multiplied), the frequency and presence penalties only the output (OpenAI's definition).

    Only the tokens a request has seen move, so the work is a gather and a scatter over those
    (O(prompt + output)), not passes over [rows, vocab]: on CPU the dense form cost ~0.6 ms a row."""
    device, vocab = logits.device, logits.shape[1]
    rows = list(range(len(requests))) if rows is None else rows
    # One key per (row, token): row * vocab + token, so a single unique() counts every row at once.
    output_keys = [torch.tensor(r.output_token_ids, dtype=torch.long) + row * vocab
                   for row, r in zip(rows, requests)]
    out_keys, out_counts = torch.unique(torch.cat(output_keys), return_counts=True)
    prompt_keys = [torch.tensor(r.prompt_token_ids, dtype=torch.long) + row * vocab
                   for row, r in zip(rows, requests) if r.params.repetition_penalty != 1.0]
    keys = torch.unique(torch.cat([out_keys, *prompt_keys]))  # sorted
    if keys.numel() == 0:
        return logits
    at = torch.searchsorted(out_keys, keys).clamp(max=max(out_keys.numel() - 1, 0))
    in_output = out_keys[at] == keys if out_keys.numel() else torch.zeros_like(keys, dtype=torch.bool)
    counts = torch.where(in_output, out_counts[at] if out_counts.numel() else 0, 0).to(logits.dtype)
    row_of, token_of = keys // vocab, keys % vocab
    # Per-logits-row parameters, looked up by each key's row.
    table = torch.zeros(logits.shape[0], 3, dtype=logits.dtype)
    table[:, 0] = 1.0
    for row, r in zip(rows, requests):
        table[row] = torch.tensor([r.params.repetition_penalty, r.params.frequency_penalty,
                                   r.params.presence_penalty], dtype=logits.dtype)
    repetition, frequency, presence = table[row_of].to(device).unbind(1)
    row_of, token_of, counts = row_of.to(device), token_of.to(device), counts.to(device)
    values = logits[row_of, token_of]
    values = torch.where(values > 0, values / repetition, values * repetition)
    values = values - frequency * counts - presence * (counts > 0).to(logits.dtype)
    logits[row_of, token_of] = values
    return logits


def top_k_logprobs(log_probs: torch.Tensor, ks: list[int]) -> list[TopLogprobs]:
    """log_probs: [N, vocab]. Row i's ks[i] most likely tokens with their logprobs, most likely first."""
    values, ids = torch.topk(log_probs, max(ks), dim=-1)  # [N, k] each, sorted
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(ks)]
