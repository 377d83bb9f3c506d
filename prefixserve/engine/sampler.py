"""Per-request sampling in a mixed batch: greedy rows by one argmax, the rest by temperature,
top-k and top-p, each drawn with the request's own generator (so a seed reproduces its tokens
whatever else is in the batch)."""

from __future__ import annotations

import torch

from prefixserve.engine.request import Request


class Sampler:
    def __init__(self, eos_token_ids: frozenset[int]):
        self.eos_token_ids = eos_token_ids

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> tuple[list[int], list[float] | None]:
        """logits: [N, vocab] fp32, one row per request. Returns token ids and, if any request
        asked for them, the chosen tokens' log-probabilities under the model's distribution."""
        logits = self._mask_min_tokens(logits, requests)
        tokens = logits.argmax(-1)  # [N]
        for i, request in enumerate(requests):
            if not request.params.greedy:
                tokens[i] = self._sample_row(logits[i], request)  # a CPU int, written into the device tensor
        logprobs = None
        if any(r.params.logprobs for r in requests):
            logprobs = torch.log_softmax(logits, -1).gather(1, tokens[:, None])[:, 0].tolist()
        return tokens.tolist(), logprobs

    def _mask_min_tokens(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        rows = [i for i, r in enumerate(requests) if r.num_output_tokens < r.params.min_tokens]
        if not rows:
            return logits
        logits = logits.clone()
        for i in rows:
            params = requests[i].params
            banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
            logits[i, list(banned)] = float("-inf")
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
