"""PEFT trainers (prefix, prompt, ptuning, lora, ia3) against the shared frozen backbone, and the
training loop every adapter trained on it shares (`train_loop`; bitfit.py trains through it too).

A job wraps the worker's one model with peft, trains the adapter's parameters with a plain AdamW
loop, exports with peft's own save_pretrained, and imports that folder through the same path as a
tenant's upload (`import_peft`), so what is published is exactly what a user could have uploaded.

Resumable: `work_dir/checkpoint.safetensors` holds the trainable parameters (prefix MLP and prompt
encoders included: peft's export keeps only their output), AdamW's state and the step. Batches are
drawn from a generator seeded by (seed, step), so a resumed run repeats the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch
from peft import (
    IA3Config,
    LoraConfig,
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptTuningConfig,
    PromptTuningInit,
    TaskType,
    get_peft_model,
)
from safetensors import safe_open
from safetensors.torch import save_file

from prefixserve.adapters_store.kinds import LORA_TARGETS
from prefixserve.adapters_store.peft_import import import_peft
from prefixserve.errors import AdapterError, TrainingDataError, TrainingFailedError
from prefixserve.training.adapter_guard import require_params_reach_loss
from prefixserve.training.backbone import TrainingBackbone
from prefixserve.training.data import EncodedExample, collate
from prefixserve.training.evaluate import evaluate, output_nll
from prefixserve.training.prefix_init import fit_prefix_encoder, real_token_prefix
from prefixserve.training.spec import Hyperparameters, ProgressEvent, ProgressFn, TrainedAdapter, check_ia3_targets

PEFT_KINDS = ("prefix", "prompt", "ptuning", "lora", "ia3")
PROMPT_KINDS = ("prefix", "prompt", "ptuning")  # kinds that put num_virtual_tokens in front of every sequence
CHECKPOINT_NAME = "checkpoint.safetensors"
MAX_GRAD_NORM = 1.0
MIN_RATE_FRACTION = 0.1  # where a "cosine" decay ends, of the peak rate


def peft_config(backbone: TrainingBackbone, kind: str, hp: Hyperparameters, init_text: str | None):
    """The peft config of a kind; `init_text` (the task's instruction or label words) seeds TEXT init
    of a soft prompt when hp.init_text is not given; with neither, the prompt starts RANDOM."""
    _check_limits(backbone, kind, hp)
    causal, num_tokens = TaskType.CAUSAL_LM, hp.num_virtual_tokens
    if kind == "prefix":  # the reparameterisation MLP stabilises training; the export is its output
        return PrefixTuningConfig(task_type=causal, num_virtual_tokens=num_tokens, prefix_projection=True,
                                  encoder_hidden_size=hp.encoder_hidden)
    if kind == "prompt":
        text = _init_text(hp, init_text)
        if text:
            return PromptTuningConfig(task_type=causal, num_virtual_tokens=num_tokens,
                                      prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=text,
                                      tokenizer_name_or_path=str(backbone.model_dir))
        return PromptTuningConfig(task_type=causal, num_virtual_tokens=num_tokens,
                                  prompt_tuning_init=PromptTuningInit.RANDOM)
    if kind == "ptuning":
        return PromptEncoderConfig(task_type=causal, num_virtual_tokens=num_tokens,
                                   encoder_hidden_size=hp.encoder_hidden,
                                   encoder_reparameterization_type=hp.encoder.upper())
    if kind == "lora":
        return LoraConfig(task_type=causal, r=hp.rank, lora_alpha=hp.alpha, target_modules=list(hp.targets),
                          lora_dropout=0.0, bias="none")
    if kind == "ia3":  # vectors start at ones: the untrained adapter is the backbone
        return IA3Config(task_type=causal, target_modules=list(hp.ia3_targets),
                         feedforward_modules=list(hp.ia3_feedforward))
    raise TrainingDataError(f"expected a kind among {list(PEFT_KINDS)} for a PEFT trainer, found {kind!r}")


def _check_limits(backbone: TrainingBackbone, kind: str, hp: Hyperparameters) -> None:
    """What the server would refuse to load is refused before training, not after."""
    limits = backbone.limits
    if kind in PROMPT_KINDS and hp.num_virtual_tokens > limits.max_virtual_tokens:
        raise TrainingDataError(f"expected hyperparameters.num_virtual_tokens of at most {limits.max_virtual_tokens} "
                                f"(the server's limit), found {hp.num_virtual_tokens}")
    if kind == "lora" and hp.rank > limits.max_lora_rank:
        raise TrainingDataError(f"expected hyperparameters.rank of at most {limits.max_lora_rank} (the server's "
                                f"limit), found {hp.rank}")
    if kind == "lora" and not set(hp.targets) <= set(LORA_TARGETS):
        raise TrainingDataError(f"expected hyperparameters.targets among {list(LORA_TARGETS)}, found "
                                f"{sorted(set(hp.targets) - set(LORA_TARGETS))}")
    if kind == "ia3":  # as parse_job_spec does: a Hyperparameters built in code has not been through it
        check_ia3_targets(hp)


@contextlib.contextmanager
def wrapped(model: torch.nn.Module, make):
    """`make(model)` -> PeftModel, undone on exit: LoRA and IA3 inject their layers into the shared model,
    so they are unloaded again (the original modules and weights come back untouched); prompt kinds only
    wrap it."""
    peft_model = make(model)
    try:
        yield peft_model
    finally:
        if not peft_model.peft_config[peft_model.active_adapter].is_prompt_learning:
            peft_model.unload()


def train_peft(backbone: TrainingBackbone, kind: str, train: list[EncodedExample], eval: list[EncodedExample],
               hp: Hyperparameters, seed: int, progress: ProgressFn, work_dir: Path, init_text: str | None = None,
               labels: tuple[str, ...] | None = None) -> TrainedAdapter:
    """Train, checkpoint, export and evaluate one adapter; the artifact is validated for `backbone`."""
    if not train:
        raise TrainingDataError("expected at least one training example, found none")
    hp = hp.with_kind_defaults(kind)
    config = peft_config(backbone, kind, hp, init_text)
    work_dir.mkdir(parents=True, exist_ok=True)

    prefix_target = _prefix_init_target(backbone, kind, hp, init_text)

    def make(model):
        with torch.random.fork_rng(devices=[]):  # peft initialises the adapter from torch's global RNG
            torch.manual_seed(seed)
            peft_model = get_peft_model(model, config)
        if prefix_target is not None:
            fit_prefix_encoder(peft_model.prompt_encoder[peft_model.active_adapter], prefix_target)
        return peft_model
    with wrapped(backbone.model, make) as peft_model:
        params = {name: p for name, p in peft_model.named_parameters() if p.requires_grad}
        require_adapter_is_used(peft_model, params, backbone, kind, train, hp, seed)
        train_loss = train_loop(peft_model, params, backbone, kind, train, eval, hp, seed, progress, work_dir,
                                init_text)
        peft_dir = work_dir / "peft"
        shutil.rmtree(peft_dir, ignore_errors=True)
        peft_model.save_pretrained(peft_dir, safe_serialization=True)
    try:
        artifact = import_peft(peft_dir, arch=backbone.arch, fingerprint=backbone.fingerprint, limits=backbone.limits)
    except AdapterError as e:
        raise TrainingFailedError(f"the trained {kind} adapter is not servable: {e.message}") from None
    metrics = {"train_loss": train_loss, "steps": float(hp.steps)}
    if eval:  # evaluate what was exported (peft loads the saved tensors), i.e. what the engine will serve
        with wrapped(backbone.model, lambda m: PeftModel.from_pretrained(m, peft_dir)) as exported:
            metrics |= evaluate(exported, backbone.tokenizer, eval, hp.eval_max_new_tokens, labels,
                                eos_token_ids=backbone.eos_token_ids)
    return TrainedAdapter(artifact=artifact, kind="prompt" if kind == "ptuning" else kind, metrics=metrics)


def require_adapter_is_used(model, params: dict[str, torch.nn.Parameter], backbone: TrainingBackbone, kind: str,
                            train: list[EncodedExample], hp: Hyperparameters, seed: int) -> None:
    """TrainingFailedError (naming the library versions) when `model`'s training forward ignores the
    adapter's `params`."""
    pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    batch = collate([train[i] for i in batch_indices(len(train), hp.batch_size, seed, 1)], pad_id)
    require_params_reach_loss(params.values(), lambda: output_nll(model, batch)[0], f"{kind} adapter")


def _init_text(hp: Hyperparameters, init_text: str | None) -> str | None:
    """The text a prompt or prefix starts from: hp.init_text, else the task's; None for init "random"."""
    return (hp.init_text or init_text) if hp.init == "text" else None


def _prefix_init_target(backbone: TrainingBackbone, kind: str, hp: Hyperparameters,
                        init_text: str | None) -> torch.Tensor | None:
    """The real-text keys and values a prefix run starts from (init "text" with a text to use), else None."""
    text = _init_text(hp, init_text)
    if kind != "prefix" or not text:
        return None
    return real_token_prefix(backbone, text, hp.num_virtual_tokens)


def batch_indices(num_examples: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The examples of `step`: a function of (seed, step) only, so a resumed job draws the same batches."""
    generator = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    return torch.randperm(num_examples, generator=generator)[:batch_size].tolist()


def learning_rate_at(hp: Hyperparameters, step: int) -> float:
    """The rate of `step` (1-based): linear warm-up to hp.learning_rate over hp.warmup_steps, then constant
    or a cosine down to MIN_RATE_FRACTION of it at hp.steps."""
    if step <= hp.warmup_steps:
        return hp.learning_rate * step / hp.warmup_steps
    if hp.decay == "constant" or hp.steps <= hp.warmup_steps + 1:
        return hp.learning_rate
    progress = (step - hp.warmup_steps - 1) / (hp.steps - hp.warmup_steps - 1)  # 0 after warm-up .. 1 at the end
    return hp.learning_rate * (MIN_RATE_FRACTION + (1 - MIN_RATE_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


def checkpoint_every(steps: int) -> int:
    return max(1, min(50, steps // 5))


def train_loop(model, params: dict[str, torch.nn.Parameter], backbone: TrainingBackbone, kind: str,
               train: list[EncodedExample], eval: list[EncodedExample], hp: Hyperparameters, seed: int,
               progress: ProgressFn, work_dir: Path, init_text: str | None) -> float:
    """Train `params` (the adapter's, which `model`'s forward applies; checkpointed under their names)
    from the checkpoint (if it is this job's) to hp.steps; returns the last window's mean loss."""
    optimizer = torch.optim.AdamW(params.values(), lr=hp.learning_rate, weight_decay=0.0)
    run_key = _run_key(backbone, kind, hp, seed, init_text, train)
    checkpoint = work_dir / CHECKPOINT_NAME
    start, last_loss = _restore(checkpoint, run_key, params, optimizer)
    pad_id = backbone.tokenizer.pad_token_id if backbone.tokenizer.pad_token_id is not None else 0
    log_every = max(1, min(10, hp.steps // 10))
    window: list[float] = []
    started = time.monotonic()
    for step in range(start + 1, hp.steps + 1):
        batch = collate([train[i] for i in batch_indices(len(train), hp.batch_size, seed, step)], pad_id)
        nll, num_tokens = output_nll(model, batch)
        loss = nll / num_tokens
        if not torch.isfinite(loss):
            raise TrainingFailedError(f"training diverged at step {step}: the loss is {loss.item()}; nothing was "
                                      f"published (try a lower learning_rate than {hp.learning_rate})")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_GRAD_NORM)
        if not torch.isfinite(grad_norm):
            raise TrainingFailedError(f"training diverged at step {step}: the gradient norm is {grad_norm.item()}; "
                                      f"nothing was published (try a lower learning_rate than {hp.learning_rate})")
        for group in optimizer.param_groups:  # a function of the step, so a resumed job follows it too
            group["lr"] = learning_rate_at(hp, step)
        optimizer.step()
        window.append(loss.item())
        if step % checkpoint_every(hp.steps) == 0 or step == hp.steps:
            _save(checkpoint, run_key, step, sum(window) / len(window), params, optimizer)
        eval_due = bool(hp.eval_every and eval and step % hp.eval_every == 0 and step < hp.steps)
        if step % log_every == 0 or step == hp.steps or eval_due:
            last_loss, window = sum(window) / len(window), []
            eta = (time.monotonic() - started) / (step - start) * (hp.steps - step)
            eval_metrics = None
            if eval_due:  # the live model, whose prefix MLP output may differ from the export in the last bit;
                # the final metrics score the export itself
                eval_metrics = evaluate(model, backbone.tokenizer, eval, hp.eval_max_new_tokens, None,
                                        eos_token_ids=backbone.eos_token_ids)
            progress(ProgressEvent(step=step, total_steps=hp.steps, loss=last_loss, eta_s=eta,
                                   eval_metrics=eval_metrics))
    return last_loss


def _run_key(backbone: TrainingBackbone, kind: str, hp: Hyperparameters, seed: int, init_text: str | None,
             train: list[EncodedExample]) -> str:
    """What a checkpoint must have been trained on to be resumed (anything else starts over)."""
    data = hashlib.sha256(json.dumps([[e.prompt_ids, e.output_ids] for e in train]).encode()).hexdigest()
    key = {"kind": kind, "hp": asdict(hp), "seed": seed, "init_text": init_text, "data": data,
           "backbone": backbone.fingerprint}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=list).encode()).hexdigest()


def _save(path: Path, run_key: str, step: int, loss: float, params: dict, optimizer) -> None:
    tensors = {f"param.{name}": p.detach().contiguous() for name, p in params.items()}
    for name, p in params.items():
        for field, value in optimizer.state[p].items():  # step (0-dim), exp_avg, exp_avg_sq
            tensors[f"adam.{field}.{name}"] = value.detach().reshape(-1).contiguous()
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"run_key": run_key, "step": str(step), "loss": repr(loss)})
    os.replace(tmp, path)  # a crash mid-write leaves the previous checkpoint intact


def _restore(path: Path, run_key: str, params: dict, optimizer) -> tuple[int, float]:
    """(step to continue after, its loss): (0, nan) when there is no usable checkpoint of this very job.
    Everything is read and checked before anything is copied, so a damaged file means starting over."""
    if not path.is_file():
        return 0, math.nan
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("run_key") != run_key:
                return 0, math.nan
            step, loss = int(f.metadata()["step"]), float(f.metadata()["loss"])
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iterator
        states = {}
        for name, p in params.items():
            state = {"step": tensors[f"adam.step.{name}"].reshape(()),
                     "exp_avg": tensors[f"adam.exp_avg.{name}"].view_as(p),
                     "exp_avg_sq": tensors[f"adam.exp_avg_sq.{name}"].view_as(p)}
            states[name] = tensors[f"param.{name}"].view_as(p), state
    except Exception:  # any unreadable or mismatched checkpoint: train from the start
        return 0, math.nan
    with torch.no_grad():
        for name, p in params.items():
            value, state = states[name]
            p.copy_(value)
            optimizer.state[p] = {k: v.to(p.device) for k, v in state.items()}
    return step, loss
