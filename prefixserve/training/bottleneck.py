"""Bottleneck adapter trainer (Houlsby et al. 2019; Pfeiffer et al. 2021), kind "adapter", against the
shared frozen backbone.

peft has no bottleneck adapters, so a job adds its own: per layer and per placement of
`bottleneck_placements`, fp32 `down` [size, hidden], `down_bias` [size], `up` [hidden, size] and `up_bias`
[hidden], applied by a forward hook to the sublayer's output y (attention's o_proj, the MLP's down_proj):
y + up(act(down(y) + down_bias)) + up_bias, computed in fp32 as the engine does. `down` starts small and
random (from a generator seeded by the job's seed), the rest at zero: the untrained task is the backbone
exactly, Houlsby's near-identity start. With `up` at zero the first step's gradient reaches only `up` and
`up_bias`; `down` follows once `up` has moved (the check that the loss sees the adapter perturbs them all).
Training is the PEFT trainers' loop (`trainers.train_loop`); the hooks are removed however the job ends.
The export is our own artifact of kind "adapter", decoded as an upload is; the final metrics score the
decoded tensors, i.e. what the engine serves.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.format import decode_artifact, encode_artifact
from prefixserve.adapters_store.kinds import BottleneckKind
from prefixserve.adapters_store.kinds.bottleneck import BottleneckWeights
from prefixserve.errors import AdapterError, TrainingDataError, TrainingFailedError
from prefixserve.kernels.bottleneck import ACTIVATION_FNS  # what the engine applies, so training matches it
from prefixserve.training.backbone import TrainingBackbone
from prefixserve.training.data import EncodedExample
from prefixserve.training.evaluate import evaluate
from prefixserve.training.spec import Hyperparameters, ProgressFn, TrainedAdapter, check_bottleneck
from prefixserve.training.trainers import require_adapter_is_used, train_loop

SUBLAYER_OUTPUTS = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}  # the module a placement follows
DOWN_INIT_STD = 1e-2


def train_bottleneck(backbone: TrainingBackbone, train: list[EncodedExample], eval: list[EncodedExample],
                     hp: Hyperparameters, seed: int, progress: ProgressFn, work_dir: Path,
                     labels: tuple[str, ...] | None = None) -> TrainedAdapter:
    """Train, checkpoint, export and evaluate one adapter task; the artifact is validated for `backbone`."""
    if not train:
        raise TrainingDataError("expected at least one training example, found none")
    hp = hp.with_kind_defaults("adapter")
    # as parse_job_spec does (a Hyperparameters built in code has not been through it), and the server's size limit
    check_bottleneck(hp, backbone.limits.max_bottleneck_size)
    work_dir.mkdir(parents=True, exist_ok=True)
    weights = initial_bottlenecks(backbone, hp.bottleneck_size, hp.bottleneck_placements, seed)
    params = {f"{stem(*key)}.{part}": p for key, parts in weights.items()
              for part, p in zip(("down", "down_bias", "up", "up_bias"), parts)}
    with added_bottlenecks(backbone.model, weights, hp.bottleneck_activation):
        require_adapter_is_used(backbone.model, params, backbone, "adapter", train, hp, seed)
        train_loss = train_loop(backbone.model, params, backbone, "adapter", train, eval, hp, seed, progress,
                                work_dir, None)
    data, artifact = _export(backbone, hp, params)
    metrics = {"train_loss": train_loss, "steps": float(hp.steps)}
    if eval:
        with added_bottlenecks(backbone.model, artifact_bottlenecks(artifact), artifact.config["activation"]):
            metrics |= evaluate(backbone.model, backbone.tokenizer, eval, hp.eval_max_new_tokens, labels,
                                eos_token_ids=backbone.eos_token_ids)
    return TrainedAdapter(artifact=data, kind="adapter", metrics=metrics)


def initial_bottlenecks(backbone: TrainingBackbone, size: int, placements: tuple[str, ...],
                        seed: int) -> BottleneckWeights:
    """Trainable (down, down_bias, up, up_bias) per (layer, placement), layers in order: down drawn from
    N(0, DOWN_INIT_STD^2) by a generator of `seed` alone (so a job's start is reproducible and torch's
    global RNG is left alone), the rest zero, so the task starts as the backbone."""
    hidden, device = backbone.arch.hidden_size, backbone.model.get_input_embeddings().weight.device
    generator = torch.Generator().manual_seed(seed)

    def param(tensor: torch.Tensor) -> torch.nn.Parameter:
        return torch.nn.Parameter(tensor.to(device))
    return {(layer, placement): (
        param(torch.randn(size, hidden, generator=generator) * DOWN_INIT_STD),  # down: [size, hidden]
        param(torch.zeros(size)),  # down_bias: [size]
        param(torch.zeros(hidden, size)),  # up: [hidden, size]
        param(torch.zeros(hidden)))  # up_bias: [hidden]
        for layer in range(backbone.arch.num_layers) for placement in placements}


def stem(layer: int, placement: str) -> str:
    return f"layers.{layer}.{placement}"


def artifact_bottlenecks(artifact: Artifact) -> BottleneckWeights:
    """The bottlenecks of a decoded adapter artifact, keyed as `added_bottlenecks` takes them."""
    return BottleneckKind.weights(artifact.tensors)


@contextlib.contextmanager
def added_bottlenecks(model: torch.nn.Module, weights: BottleneckWeights, activation: str):
    """`model` (a transformers Llama) with each (layer, placement)'s bottleneck added to that sublayer's
    output inside the block only: the hooks come off on the way out, whatever raised (divergence, a killed job)."""
    act = ACTIVATION_FNS[activation]
    handles = []
    try:
        for (layer, placement), parts in weights.items():
            module = model.get_submodule(f"model.layers.{layer}.{SUBLAYER_OUTPUTS[placement]}")
            device = module.weight.device  # a decoded artifact's tensors are on the CPU; a Parameter there stays itself
            handles.append(module.register_forward_hook(_adds_bottleneck(*(t.to(device) for t in parts), act)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _adds_bottleneck(down: torch.Tensor, down_bias: torch.Tensor, up: torch.Tensor, up_bias: torch.Tensor, act):
    def hook(module, inputs, y):  # y: [B, T, hidden]
        y32 = y.float()
        out = y32 + F.linear(act(F.linear(y32, down.float(), down_bias.float())), up.float(), up_bias.float())
        return out.to(y.dtype)
    return hook


def _export(backbone: TrainingBackbone, hp: Hyperparameters,
            params: dict[str, torch.Tensor]) -> tuple[bytes, Artifact]:
    """The artifact's bytes, and what the server decodes of them (TrainingFailedError if it would refuse them)."""
    tensors = {name: p.detach().cpu().clone() for name, p in params.items()}
    config = {"size": hp.bottleneck_size, "placements": list(hp.bottleneck_placements),
              "activation": hp.bottleneck_activation}
    try:
        data = encode_artifact("adapter", config, tensors, backbone.fingerprint)
        artifact = decode_artifact(data, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                                   arch=backbone.arch)
    except AdapterError as e:
        raise TrainingFailedError(f"the trained adapter is not servable: {e.message}") from None
    return data, artifact
