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
            rows = torch.tensor(penalized, device=logits.device)
            logits[rows] = apply_penalties(logits[rows], [requests[i] for i in penalized])
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


def apply_penalties(logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
    """logits: [P, vocab], one row per request that uses a penalty. As vLLM: the repetition penalty
    covers prompt and output tokens (positive logits divided by it, negative ones multiplied), the
    frequency and presence penalties only the output (OpenAI's definition)."""
    device, vocab = logits.device, logits.shape[1]
    # Output token counts: one scatter over the rows, padded with a column past the vocabulary.
    outputs = [r.output_token_ids for r in requests]
    width = max(map(len, outputs), default=0)
    counts = torch.zeros(len(requests), vocab + 1, device=device)
    if width:
        ids = torch.full((len(requests), width), vocab, dtype=torch.long)
        for row, out in enumerate(outputs):
            ids[row, :len(out)] = torch.tensor(out, dtype=torch.long)
        counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device))
    counts = counts[:, :vocab]  # [P, vocab]
    params = [r.params for r in requests]
    repetition = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    if (repetition != 1.0).any():
        seen = counts > 0
        for row, r in enumerate(requests):
            if r.params.repetition_penalty != 1.0:
                seen[row, torch.tensor(r.prompt_token_ids, device=device)] = True
        penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
        logits = torch.where(seen, penalized, logits)
    frequency = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    return logits - frequency * counts - presence * (counts > 0).to(logits.dtype)


def top_k_logprobs(log_probs: torch.Tensor, ks: list[int]) -> list[TopLogprobs]:
    """log_probs: [N, vocab]. Row i's ks[i] most likely tokens with their logprobs, most likely first."""
    values, ids = torch.topk(log_probs, max(ks), dim=-1)  # [N, k] each, sorted
    values, ids = values.tolist(), ids.tolist()
    return [list(zip(ids[i][:k], values[i][:k])) for i, k in enumerate(ks)]
