"""Intrinsic Prompt Tuning (Qin et al., arXiv 2110.07867): tasks share a low-dimensional subspace of
soft prompts.

MSF (multi-task subspace finding): an autoencoder over prompt-tuned soft prompts of several source
tasks, encoder Linear(P*hidden -> d), decoder Linear(d -> Hd), tanh, Linear(Hd -> P*hidden), trained
with the tasks' LM loss through the reconstructed prompt plus mse_weight * MSE(reconstruction,
original). Its decoder is published as a `subspace` artifact.

IST (intrinsic subspace tuning): a new task trains only z in R^d through the frozen decoder and is
published as an `intrinsic` artifact naming the subspace by version. Training decodes z with
`SubspaceKind.decode`, the very function the engine uses, so the trained prompt is the served one.

One departure from the paper: the subspace artifact also carries its sources' z (`source_vectors`),
and IST starts from whichever of them, or the paper's N(0, 0.02) draw, has the lowest loss on a batch
of the new task. From the paper's start alone, 100 steps left a task whose output format a source
shares (longer_word next to alphabetical_first) stuck at a loss of 3.2 and 2% exact match.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.format import decode_artifact, encode_artifact
from prefixserve.adapters_store.kinds import SubspaceKind
from prefixserve.errors import AdapterError, TrainingDataError, TrainingFailedError
from prefixserve.training.adapter_guard import require_params_reach_loss
from prefixserve.training.backbone import TrainingBackbone
from prefixserve.training.data import EncodedExample
from prefixserve.training.soft_prompt import evaluate_soft_prompt, soft_prompt_loss
from prefixserve.training.spec import Hyperparameters, ProgressEvent, ProgressFn, TrainedAdapter
from prefixserve.training.trainers import MAX_GRAD_NORM, batch_indices

TASKS_PER_STEP = 4  # source tasks in one MSF step; the step's batch_size examples are split among them
Z_INIT_STD = 0.02  # the paper's N(0, 0.02) init of an IST vector
START_BATCH = 16  # training examples that score IST's candidate starting points
RECONSTRUCTION_STEPS = 300  # MSE-only warm-up of MSF: fits 20+ prompts to ~1e-12 in well under a minute


@dataclass
class SubspaceSource:
    """A prompt-tuned source task of MSF: its soft prompt and its data."""

    task: str
    soft_prompt: torch.Tensor  # [P, hidden]
    train: list[EncodedExample]
    eval: list[EncodedExample]


@dataclass(frozen=True)
class SubspaceAdapter(TrainedAdapter):
    """A subspace artifact plus each source's intrinsic vector (its encoder output in the published
    decoder's standardized coordinates, d floats): publishing {"z": source_vectors[task]} as an
    `intrinsic` task serves that source's reconstructed prompt."""

    source_vectors: dict[str, tuple[float, ...]] = field(default_factory=dict)


class PromptAutoencoder(nn.Module):
    """IPT's autoencoder; `decoder`'s state dict is exactly the subspace artifact's tensors."""

    def __init__(self, num_tokens: int, hidden: int, dim: int, decoder_hidden: int):
        super().__init__()
        self.num_tokens, self.hidden = num_tokens, hidden
        self.encoder = nn.Linear(num_tokens * hidden, dim)
        self.decoder = nn.Sequential(nn.Linear(dim, decoder_hidden), nn.Tanh(),
                                     nn.Linear(decoder_hidden, num_tokens * hidden))

    def encode(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.encoder(prompts.flatten(1))  # [N, P, hidden] -> [N, d]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z).view(-1, self.num_tokens, self.hidden)  # [N, d] -> [N, P, hidden]

    def forward(self, prompts: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(prompts))  # [N, P, hidden]


def fit_autoencoder(backbone: TrainingBackbone, sources: list[SubspaceSource], hp: Hyperparameters, seed: int,
                    progress: ProgressFn, reconstruction_steps: int = RECONSTRUCTION_STEPS,
                    ) -> tuple[PromptAutoencoder, float, float]:
    """MSF's training: (autoencoder, final mean loss, final mean LM part of it). P comes from the
    sources (all must share it); d, decoder_hidden, mse_weight, steps, learning_rate (the autoencoder's,
    ~1e-3) and batch_size (examples per step, split over TASKS_PER_STEP sampled sources) from `hp`.

    First `reconstruction_steps` on the MSE alone (no backbone: seconds), then hp.steps on the paper's
    objective. Both decay the rate to zero (cosine): Adam moves every one of the P*hidden x Hd decoder
    weights by ~lr a step, so a constant rate keeps the reconstructions jittering by far more than the
    precision a soft prompt needs."""
    hp = hp.with_kind_defaults("subspace")
    prompts = _check_sources(backbone, sources)  # [N, P, hidden]
    num_sources, num_tokens, hidden = prompts.shape
    torch.manual_seed(seed)
    ae = PromptAutoencoder(num_tokens, hidden, hp.intrinsic_dim, hp.decoder_hidden)
    with torch.no_grad():  # start from the sources' mean prompt, not from a random one
        ae.decoder[2].bias.copy_(prompts.mean(0).flatten())
        ae.decoder[2].weight.mul_(0.1)
    optimizer, schedule = _cosine_adam(ae.parameters(), hp.learning_rate, reconstruction_steps)
    for step in range(1, reconstruction_steps + 1):
        _step(optimizer, list(ae.parameters()), (ae(prompts) - prompts).pow(2).mean(), step, hp)
        schedule.step()
    optimizer, schedule = _cosine_adam(ae.parameters(), hp.learning_rate, hp.steps)
    tasks_per_step = min(TASKS_PER_STEP, num_sources)
    per_task = max(1, hp.batch_size // tasks_per_step)
    losses = _Losses(hp.steps)
    _require_soft_prompt_is_used(backbone, prompts[0], sources[0].train[:hp.batch_size])
    for step in range(1, hp.steps + 1):
        task_ids = batch_indices(num_sources, tasks_per_step, seed, step)
        batch = [sources[t].train[i] for t in task_ids
                 for i in batch_indices(len(sources[t].train), per_task, seed + 7919 * (t + 1), step)]
        owner = torch.tensor([k for k, t in enumerate(task_ids)
                              for _ in range(min(per_task, len(sources[t].train)))])  # [B] row of task_ids
        recon = ae(prompts)  # [N, P, hidden]
        lm = soft_prompt_loss(backbone.model, recon[task_ids][owner], batch, per_example=True)  # [B]
        counts = torch.bincount(owner, minlength=len(task_ids))  # [k]
        lm_per_task = torch.zeros(len(task_ids)).index_add(0, owner, lm) / counts  # [k]
        # The objective is the mean over sources of LM + mse_weight * MSE. The LM part needs the backbone, so
        # it is estimated on the sampled sources; the MSE part costs nothing next to it, so it is taken over
        # every source each step (sampled, it left 15% of the prompts' spread unreconstructed after 300 steps).
        mse = (recon - prompts).pow(2).mean()
        loss = lm_per_task.mean() + hp.mse_weight * mse
        _step(optimizer, list(ae.parameters()), loss, step, hp)
        schedule.step()
        losses.add(step, loss.item(), progress, lm=lm_per_task.mean().item())
    return ae.eval(), losses.last, losses.parts["lm"]


def train_subspace(backbone: TrainingBackbone, sources: list[SubspaceSource], hp: Hyperparameters, seed: int,
                   progress: ProgressFn) -> SubspaceAdapter:
    """MSF (see fit_autoencoder), then publish the decoder and score every source through the
    reconstruction the engine would serve for it."""
    ae, train_loss, lm_loss = fit_autoencoder(backbone, sources, hp, seed, progress)
    prompts = torch.stack([s.soft_prompt.detach().float() for s in sources])  # [N, P, hidden]
    decoder, vectors = _standardized(ae, prompts)
    config = {"intrinsic_dim": hp.intrinsic_dim, "num_virtual_tokens": ae.num_tokens,
              "decoder_hidden": hp.decoder_hidden}
    artifact = _publish(backbone, "subspace", config, {**decoder, "source_vectors": vectors})
    served = torch.stack([SubspaceKind.decode(artifact.tensors, z, config) for z in vectors])  # [N, P, hidden]
    metrics = {"train_loss": train_loss, "lm_loss": lm_loss, "steps": float(hp.steps),
               "reconstruction_mse": float((served - prompts).pow(2).mean()),
               **_seen_metrics(backbone, sources, served, hp)}
    return SubspaceAdapter(artifact=artifact.data, kind="subspace", metrics=metrics,
                           source_vectors={s.task: tuple(z.tolist()) for s, z in zip(sources, vectors)})


def train_intrinsic(backbone: TrainingBackbone, subspace: Artifact, subspace_version: str,
                    train: list[EncodedExample], eval: list[EncodedExample], hp: Hyperparameters, seed: int,
                    progress: ProgressFn) -> TrainedAdapter:
    """IST: only z (d floats) is trained, through the frozen decoder. It starts from the best of the
    paper's N(0, 0.02) draw (from `seed`) and the subspace's source vectors (see the module docstring)."""
    if subspace.kind != "subspace":
        raise TrainingDataError(f"expected hyperparameters.subspace to name a subspace artifact, found kind "
                                f"{subspace.kind!r}")
    if subspace_version != subspace.version:
        raise TrainingDataError(f"expected subspace_version to be the subspace artifact's version "
                                f"{subspace.version}, found {subspace_version}")
    if not train:
        raise TrainingDataError("expected at least one training example, found none")
    hp = hp.with_kind_defaults("intrinsic")
    config = subspace.config
    rows = subspace.tensors["decoder.2.bias"].shape[0]
    if rows != config["num_virtual_tokens"] * backbone.arch.hidden_size:
        raise TrainingDataError(f"expected a subspace decoding into this backbone's hidden size "
                                f"{backbone.arch.hidden_size}, found {rows // config['num_virtual_tokens']}")
    decoder = {name: t.detach().float() for name, t in subspace.tensors.items()}  # frozen: no grad
    generator = torch.Generator().manual_seed(seed)
    paper_init = torch.randn(config["intrinsic_dim"], generator=generator) * Z_INIT_STD  # [d]
    start, start_index, start_loss = _best_start(backbone, decoder, config, paper_init, train, seed)
    _require_soft_prompt_is_used(backbone, SubspaceKind.decode(decoder, start, config),
                                 [train[i] for i in batch_indices(len(train), hp.batch_size, seed, 1)])
    z = nn.Parameter(start.clone())  # [d]
    optimizer = torch.optim.AdamW([z], lr=hp.learning_rate, weight_decay=0.0)
    losses = _Losses(hp.steps)
    for step in range(1, hp.steps + 1):
        batch = [train[i] for i in batch_indices(len(train), hp.batch_size, seed, step)]
        loss = soft_prompt_loss(backbone.model, SubspaceKind.decode(decoder, z, config), batch)
        _step(optimizer, [z], loss, step, hp)
        losses.add(step, loss.item(), progress)

    artifact = _publish(backbone, "intrinsic", {"subspace_version": subspace_version}, {"z": z.detach()})
    # start_source: the row of source_vectors IST started from, -1 for the paper's draw
    metrics = {"train_loss": losses.last, "steps": float(hp.steps), "start_source": float(start_index),
               "start_loss": start_loss}
    if eval:
        prompt = SubspaceKind.decode(subspace.tensors, artifact.tensors["z"], config)  # [P, hidden] as served
        metrics |= evaluate_soft_prompt(backbone.model, backbone.tokenizer, prompt, eval, hp.eval_max_new_tokens,
                                        backbone.eos_token_ids)
    return TrainedAdapter(artifact=artifact.data, kind="intrinsic", metrics=metrics)


# ---- helpers -----------------------------------------------------------------------------------
def _require_soft_prompt_is_used(backbone: TrainingBackbone, prompt: torch.Tensor, batch: list[EncodedExample]) -> None:
    """TrainingFailedError (naming the library versions) when the backbone's forward ignores a soft prompt
    [P, hidden] handed to it as input embeddings."""
    if not batch:
        return
    probe = prompt.detach().clone()
    require_params_reach_loss([probe], lambda: soft_prompt_loss(backbone.model, probe, batch), "soft prompt")


@torch.no_grad()
def _best_start(backbone: TrainingBackbone, decoder: dict[str, torch.Tensor], config: dict,
                paper_init: torch.Tensor, train: list[EncodedExample], seed: int) -> tuple[torch.Tensor, int, float]:
    """(z to start IST from [d], its row in source_vectors or -1 for paper_init, its loss) over one
    fixed batch of the new task's training examples."""
    candidates = [paper_init, *decoder.get("source_vectors", torch.empty(0, paper_init.shape[0]))]  # each [d]
    batch = [train[i] for i in batch_indices(len(train), START_BATCH, seed, 0)]
    losses = [soft_prompt_loss(backbone.model, SubspaceKind.decode(decoder, z, config), batch).item()
              for z in candidates]
    best = min(range(len(candidates)), key=losses.__getitem__)
    return candidates[best].float(), best - 1, losses[best]


@dataclass
class _Published:
    data: bytes
    tensors: dict[str, torch.Tensor]


class _Losses:
    """Running means of the loss (and named parts of it) over a logging window, reported as ProgressEvents."""

    def __init__(self, total_steps: int):
        self.total, self.every = total_steps, max(1, min(10, total_steps // 10))
        self.window: list[dict[str, float]] = []
        self.last = float("nan")
        self.parts: dict[str, float] = {}
        self.started = time.monotonic()

    def add(self, step: int, loss: float, progress: ProgressFn, **parts: float) -> None:
        self.window.append({"loss": loss, **parts})
        if step % self.every == 0 or step == self.total:
            means = {k: sum(w[k] for w in self.window) / len(self.window) for k in self.window[0]}
            self.last, self.window = means.pop("loss"), []
            self.parts = means
            eta = (time.monotonic() - self.started) / step * (self.total - step)
            progress(ProgressEvent(step=step, total_steps=self.total, loss=self.last, eta_s=eta))


def _step(optimizer, params: list[torch.Tensor], loss: torch.Tensor, step: int, hp: Hyperparameters) -> None:
    if not torch.isfinite(loss):
        raise TrainingFailedError(f"training diverged at step {step}: the loss is {loss.item()}; nothing was "
                                  f"published (try a lower learning_rate than {hp.learning_rate})")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
    if not torch.isfinite(grad_norm):
        raise TrainingFailedError(f"training diverged at step {step}: the gradient norm is {grad_norm.item()}; "
                                  f"nothing was published (try a lower learning_rate than {hp.learning_rate})")
    optimizer.step()


def _cosine_adam(params, lr: float, steps: int):
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))


def _publish(backbone: TrainingBackbone, kind: str, config: dict, tensors: dict[str, torch.Tensor]) -> _Published:
    """Encode and validate against the backbone exactly as the server will (the tensors come back decoded)."""
    try:
        data = encode_artifact(kind, config, tensors, backbone.fingerprint)
        artifact = decode_artifact(data, expected_fingerprint=backbone.fingerprint, limits=backbone.limits,
                                   arch=backbone.arch)
    except AdapterError as e:
        raise TrainingFailedError(f"the trained {kind} artifact is not servable: {e.message}") from None
    return _Published(data, artifact.tensors)


@torch.no_grad()
def _standardized(ae: PromptAutoencoder, prompts: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(decoder tensors, source vectors [N, d]) in coordinates where the sources' z have mean 0 and std 1
    per dimension. Adam on the P*hidden-wide encoder grows z to tens in a few steps; IST starts at
    N(0, 0.02) with a soft-prompt-sized rate, so it needs the sources at unit scale around the origin.
    W0 z + b0 = (W0 diag(s)) (z - mu) / s + (b0 + W0 mu): the decoder computes the same prompts."""
    z = ae.encode(prompts)  # [N, d]
    mu, scale = z.mean(0), z.std(0, unbiased=False).clamp(min=1e-6)  # [d], [d]
    w0, b0 = ae.decoder[0].weight, ae.decoder[0].bias  # [Hd, d], [Hd]
    decoder = {"decoder.0.weight": w0 * scale, "decoder.0.bias": b0 + w0 @ mu,
               "decoder.2.weight": ae.decoder[2].weight.clone(), "decoder.2.bias": ae.decoder[2].bias.clone()}
    return decoder, (z - mu) / scale


def _check_sources(backbone: TrainingBackbone, sources: list[SubspaceSource]) -> torch.Tensor:
    """The sources' prompts stacked [N, P, hidden]; TrainingDataError unless MSF can use them."""
    if len(sources) < 2:
        raise TrainingDataError(f"expected at least 2 source tasks to find a shared subspace, found {len(sources)}")
    expected = (sources[0].soft_prompt.shape[0], backbone.arch.hidden_size)
    for source in sources:
        shape = tuple(source.soft_prompt.shape)
        if shape != expected:
            raise TrainingDataError(f"source {source.task!r}: expected a soft prompt of shape [P, hidden] = "
                                    f"{list(expected)} like {sources[0].task!r}, found {list(shape)}")
        if not source.train:
            raise TrainingDataError(f"source {source.task!r}: expected training examples, found none")
    return torch.stack([s.soft_prompt.detach().float() for s in sources])


def _seen_metrics(backbone: TrainingBackbone, sources: list[SubspaceSource], served: torch.Tensor,
                  hp: Hyperparameters) -> dict[str, float]:
    """Exact match of each source through its served reconstruction vs its original prompt (the paper's
    seen-task recovery compares these gains over zero-shot)."""
    metrics: dict[str, float] = {}
    for source, recon in zip(sources, served):
        if not source.eval:
            continue
        for name, prompt in (("reconstructed", recon), ("original", source.soft_prompt.detach().float())):
            result = evaluate_soft_prompt(backbone.model, backbone.tokenizer, prompt, source.eval,
                                          hp.eval_max_new_tokens, backbone.eos_token_ids)
            metrics[f"{source.task}/exact_match_{name}"] = result["exact_match"]
    for name in ("reconstructed", "original"):
        values = [v for k, v in metrics.items() if k.endswith(f"/exact_match_{name}")]
        if values:
            metrics[f"seen_exact_match_{name}"] = sum(values) / len(values)
    return metrics
