"""BitFit trainer (Ben Zaken et al. 2022) against the shared frozen backbone.

peft has no BitFit, and a Llama's projections have no biases to unfreeze, so a job adds its own: one
zero-initialised fp32 vector per (layer, projection) of `bitfit_targets`, added to that projection's
output by a forward hook, so the untrained task is the backbone. Only those vectors train, through the
PEFT trainers' loop (`trainers.train_loop`: the checkpoint and resume, the learning-rate schedule, the
divergence checks) after the same check that the loss sees them. The hooks are removed however the job
ends, so the shared model is exactly as it was. The export is our own artifact of kind "bitfit",
decoded as an upload is; the final metrics score the decoded biases, i.e. what the engine serves.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.format import decode_artifact, encode_artifact
from prefixserve.adapters_store.kinds import LORA_TARGETS, BitFitKind, lora_features
from prefixserve.errors import AdapterError, TrainingDataError, TrainingFailedError
from prefixserve.training.backbone import TrainingBackbone
from prefixserve.training.data import EncodedExample
from prefixserve.training.evaluate import evaluate
from prefixserve.training.spec import Hyperparameters, ProgressFn, TrainedAdapter, check_bitfit_targets
from prefixserve.training.trainers import require_adapter_is_used, train_loop

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")  # the rest are the MLP's

Biases = dict[tuple[int, str], torch.Tensor]  # (layer, target) -> [out_features]


def train_bitfit(backbone: TrainingBackbone, train: list[EncodedExample], eval: list[EncodedExample],
                 hp: Hyperparameters, seed: int, progress: ProgressFn, work_dir: Path,
                 labels: tuple[str, ...] | None = None) -> TrainedAdapter:
    """Train, checkpoint, export and evaluate one bitfit task; the artifact is validated for `backbone`."""
    if not train:
        raise TrainingDataError("expected at least one training example, found none")
    hp = hp.with_kind_defaults("bitfit")
    check_bitfit_targets(hp)  # as parse_job_spec does: a Hyperparameters built in code has not been through it
    work_dir.mkdir(parents=True, exist_ok=True)
    biases = zero_biases(backbone, hp.bitfit_targets)
    params = {bias_name(*key): bias for key, bias in biases.items()}
    with added_biases(backbone.model, biases):
        require_adapter_is_used(backbone.model, params, backbone, "bitfit", train, hp, seed)
        train_loss = train_loop(backbone.model, params, backbone, "bitfit", train, eval, hp, seed, progress,
                                work_dir, None)
    data, artifact = _export(backbone, hp, params)
    metrics = {"train_loss": train_loss, "steps": float(hp.steps)}
    if eval:
        with added_biases(backbone.model, artifact_biases(artifact)):
            metrics |= evaluate(backbone.model, backbone.tokenizer, eval, hp.eval_max_new_tokens, labels,
                                eos_token_ids=backbone.eos_token_ids)
    return TrainedAdapter(artifact=data, kind="bitfit", metrics=metrics)


def zero_biases(backbone: TrainingBackbone, targets: tuple[str, ...]) -> Biases:
    """A trainable zero vector per (layer, target), layers in order and targets in LORA_TARGETS order."""
    features, device = lora_features(backbone.arch), backbone.model.get_input_embeddings().weight.device
    return {(layer, target): torch.nn.Parameter(torch.zeros(features[target][1], device=device))
            for layer in range(backbone.arch.num_layers) for target in LORA_TARGETS if target in targets}


def bias_name(layer: int, target: str) -> str:
    return f"layers.{layer}.{target}.bias"


def artifact_biases(artifact: Artifact) -> Biases:
    """The biases of a decoded bitfit artifact, keyed as `added_biases` takes them."""
    return {(layer, target): bias for (layer, target, _), bias in BitFitKind.vectors(artifact.tensors).items()}


@contextlib.contextmanager
def added_biases(model: torch.nn.Module, biases: Biases):
    """`model` (a transformers Llama) with each bias added to its projection's output inside the block
    only: the hooks come off on the way out, whatever raised (divergence, a killed job)."""
    handles = []
    try:
        for (layer, target), bias in biases.items():
            block = "self_attn" if target in ATTENTION_TARGETS else "mlp"
            projection = model.get_submodule(f"model.layers.{layer}.{block}.{target}")
            handles.append(projection.register_forward_hook(_adds(bias)))
        yield model
    finally:
        for handle in handles:
            handle.remove()


def _adds(bias: torch.Tensor):
    def hook(module, inputs, output):  # output: [B, T, out_features]
        return output + bias
    return hook


def _export(backbone: TrainingBackbone, hp: Hyperparameters,
            params: dict[str, torch.Tensor]) -> tuple[bytes, Artifact]:
    """The artifact's bytes, and what the server decodes of them (TrainingFailedError if it would refuse them)."""
    tensors = {name: p.detach().cpu().clone() for name, p in params.items()}
    try:
        data = encode_artifact("bitfit", {"targets": sorted(set(hp.bitfit_targets))}, tensors, backbone.fingerprint)
        artifact = decode_artifact(data, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                                   arch=backbone.arch)
    except AdapterError as e:
        raise TrainingFailedError(f"the trained bitfit adapter is not servable: {e.message}") from None
    return data, artifact
