"""Helpers shared by tests (tests/ is on sys.path through its conftest)."""

import threading

import torch

from prefixserve.adapters_store.local_store import LocalStore


def random_prompts(lengths, vocab=512, seed=0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=g).tolist() for n in lengths]


@torch.inference_mode()
def hf_greedy(hf_model, prompt_ids: list[int], max_new_tokens: int, eos_token_id=None) -> list[int]:
    """transformers' own greedy generate, one prompt at a time (no padding), as the reference.
    With eos_token_id None it runs the full length (as our ignore_eos)."""
    out = hf_model.generate(torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False,
                            eos_token_id=eos_token_id, pad_token_id=0,
                            min_new_tokens=0 if eos_token_id is not None else max_new_tokens)
    tokens = out[0, len(prompt_ids):].tolist()
    if eos_token_id is not None and eos_token_id in tokens:
        tokens = tokens[:tokens.index(eos_token_id) + 1]
    return tokens


def max_rel_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """max |ours - ref| relative to the largest reference magnitude (logit scale)."""
    return float((ours.float() - ref.float()).abs().max() / ref.float().abs().max())


def capture_logits(engine) -> list[tuple[str | None, list[int], torch.Tensor]]:
    """Record (task, token prefix, logits row) for every sampled row of every step the engine runs."""
    seen, execute = [], engine.runner.execute

    def wrapped(step):
        result = execute(step)
        seen.extend((r.task, list(r.token_ids), row) for r, row in zip(result.sampling_requests, result.logits))
        return result

    engine.runner.execute = wrapped
    return seen


class GatedStore(LocalStore):
    """A LocalStore whose put waits until the test opens the gate (a store write that takes long)."""

    def __init__(self, root):
        super().__init__(root)
        self.writing, self.gate = threading.Event(), threading.Event()

    def put(self, task, data, kind, requires=(), card=None):
        self.writing.set()
        if not self.gate.wait(60):
            raise TimeoutError("the test never opened the gate")
        return super().put(task, data, kind, requires, card)
