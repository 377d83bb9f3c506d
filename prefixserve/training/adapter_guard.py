"""Fail loudly when an upgrade makes the backbone ignore an adapter.

transformers 5.24 renamed the forward's `past_key_values` argument to `cache`, and peft 0.21's
`generate` then silently dropped prefix-tuning prefixes: a job trained or evaluated through that
path would publish an adapter nobody ever saw. Before a job trains, `require_params_reach_loss`
perturbs the adapter's trainable parameters and checks that the loss moves; if it does not, the job
fails with the installed versions named, and nothing is published.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from importlib import metadata

import torch

from prefixserve.errors import TrainingFailedError

# Noise of this many times a tensor's largest magnitude (at least 1): enough to move any adapter that
# reaches the output (a LoRA B starts at zero), whatever its scale; the tensors are restored after.
PERTURBATION_STD = 0.1
# The loss of an ignored adapter is recomputed by the very same ops: it repeats to the last bit.
UNCHANGED_TOLERANCE = 1e-7


def library_versions() -> str:
    """'transformers X, peft Y, torch Z' as installed (what a bug report about a break needs)."""
    parts = []
    for name in ("transformers", "peft", "torch"):
        try:
            parts.append(f"{name} {metadata.version(name)}")
        except metadata.PackageNotFoundError:
            parts.append(f"{name} (not installed)")
    return ", ".join(parts)


@torch.no_grad()
def loss_ignores(params: Iterable[torch.Tensor], loss_fn: Callable[[], torch.Tensor], seed: int = 0) -> bool:
    """Whether `loss_fn()` stays what it was when every tensor in `params` gets Gaussian noise. The
    tensors are restored exactly, and torch's global RNG is left alone (a resumed job must draw what
    the uninterrupted one would). A non-finite loss is not judged here (False): the training loop
    reports it as divergence at step 1."""
    params = list(params)
    before = float(loss_fn())
    if not math.isfinite(before):
        return False
    saved = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(seed)
    try:
        for p in params:
            scale = PERTURBATION_STD * max(1.0, float(p.detach().abs().max()))
            p.add_(torch.randn(p.shape, generator=generator).to(p) * scale)
        after = float(loss_fn())
    finally:
        for p, value in zip(params, saved):
            p.copy_(value)
    return abs(after - before) <= UNCHANGED_TOLERANCE * max(1.0, abs(before))


def require_params_reach_loss(params: Iterable[torch.Tensor], loss_fn: Callable[[], torch.Tensor], what: str) -> None:
    """TrainingFailedError unless perturbing `params` moves the loss; `what` names the adapter."""
    if loss_ignores(params, loss_fn):
        raise TrainingFailedError(
            f"expected the {what} to change the backbone's output, found the loss unchanged when its parameters "
            f"are perturbed: the installed libraries ({library_versions()}) ignore it, so training would publish "
            f"an adapter the model never used. Nothing was trained or published; install the versions in "
            f"requirements.lock")
