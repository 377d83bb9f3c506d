"""One training job, start to finish but unpublished: data -> tokens -> trainer -> validated artifact.

The worker publishes the result (`store.put(spec.task, result.artifact, result.kind)`); a job that
raises publishes nothing. TrainingDataError: the data or spec cannot be trained on; TrainingFailedError:
training ran but gave no usable adapter (divergence, an adapter the server would refuse)."""

from __future__ import annotations

import math
from dataclasses import asdict, replace
from pathlib import Path

from prefixserve.adapters_store.artifact import Artifact
from prefixserve.adapters_store.format import decode_artifact
from prefixserve.adapters_store.store import AdapterStore
from prefixserve.errors import AdapterError, TrainingDataError, TrainingFailedError
from prefixserve.training.backbone import TrainingBackbone
from prefixserve.training.baselines import BaselineScores, score_baselines
from prefixserve.training.bitfit import train_bitfit
from prefixserve.training.bottleneck import train_bottleneck
from prefixserve.training.data import EncodedExample, JobData, encode_examples, job_data
from prefixserve.training.spec import JobSpec, ProgressFn, TrainedAdapter
from prefixserve.training.trainers import PEFT_KINDS, PROMPT_KINDS, train_peft


def run_job(spec: JobSpec, backbone: TrainingBackbone, store: AdapterStore, progress: ProgressFn,
            work_dir: Path) -> TrainedAdapter:
    """Train `spec` against `backbone`; `work_dir` keeps the resumable checkpoint (and a PEFT kind's export)."""
    hp = spec.hyperparameters
    data, baselines = None, None
    if spec.kind == "subspace":
        result = _run_subspace(spec, backbone, store, progress)
    elif spec.kind in (*PEFT_KINDS, "bitfit", "adapter", "intrinsic"):
        data = job_data(spec)
        train, eval_ = _encode(backbone, spec, data)
        if spec.kind == "intrinsic":
            from prefixserve.training import ipt

            version, subspace = _published(backbone, store, hp.subspace, "hyperparameters.subspace")
            if subspace.kind != "subspace":
                raise TrainingDataError(f"hyperparameters.subspace: expected task {hp.subspace!r} to hold a "
                                        f"subspace artifact, found kind {subspace.kind!r}")
            result = ipt.train_intrinsic(backbone, subspace=subspace, subspace_version=version, train=train,
                                         eval=eval_, hp=hp, seed=spec.seed, progress=progress)
        elif spec.kind == "bitfit":
            result = train_bitfit(backbone, train, eval_, hp, spec.seed, progress, work_dir, labels=data.labels)
        elif spec.kind == "adapter":
            result = train_bottleneck(backbone, train, eval_, hp, spec.seed, progress, work_dir, labels=data.labels)
        else:
            init_text = data.instruction or (" ".join(data.labels) if data.labels else None)
            result = train_peft(backbone, spec.kind, train, eval_, hp, spec.seed, progress, work_dir,
                                init_text=init_text, labels=data.labels)
        if eval_:  # what the tenant gains over writing the instruction and examples into the prompt
            baselines = score_baselines(backbone, data, hp.eval_max_new_tokens)
            result.metrics.update(baselines.metrics | {
                "best_baseline_exact_match": baselines.best_exact_match,
                "lift_over_best_baseline": result.metrics["exact_match"] - baselines.best_exact_match})
    else:
        raise TrainingDataError(f"expected 'kind' among {[*PEFT_KINDS, 'bitfit', 'adapter', 'subspace', 'intrinsic']}, "
                                f"found {spec.kind!r}")
    artifact = _check_result(backbone, result)
    return replace(result, card=_card(spec, data, baselines, artifact, result.metrics))


def _encode(backbone: TrainingBackbone, spec: JobSpec, data: JobData,
            where: str = "") -> tuple[list[EncodedExample], list[EncodedExample]]:
    """Token ids of both splits; an example longer than max_length, or than the context left after the
    virtual tokens, fails the job naming it."""
    hp = spec.hyperparameters
    num_virtual = hp.num_virtual_tokens if spec.kind in (*PROMPT_KINDS, "subspace", "intrinsic") else 0
    context_left = backbone.max_model_len - num_virtual
    if context_left < 2:
        raise TrainingDataError(f"expected num_virtual_tokens below the backbone's context of "
                                f"{backbone.max_model_len} tokens, found {num_virtual}")
    max_length = min(hp.max_length, context_left)
    tokenizer = backbone.tokenizer
    if not spec.examples:  # a suite task: its splits are what the tenant knows it by
        return (encode_examples(tokenizer, data.train, max_length, f"{where}suite task {spec.suite_task!r} train"),
                encode_examples(tokenizer, data.eval, max_length, f"{where}suite task {spec.suite_task!r} eval"))
    # Encode in the order submitted so an error names the tenant's own index, then follow the split.
    encoded = {id(e): x for e, x in zip(spec.examples, encode_examples(tokenizer, list(spec.examples), max_length,
                                                                       f"{where}examples"))}
    encoded |= {id(e): x for e, x in zip(spec.eval_examples, encode_examples(
        tokenizer, list(spec.eval_examples), max_length, f"{where}eval_examples"))}
    return [encoded[id(e)] for e in data.train], [encoded[id(e)] for e in data.eval]


def _published(backbone: TrainingBackbone, store: AdapterStore, task: str, where: str) -> tuple[str, Artifact]:
    """The task's current artifact (version, decoded for this backbone) or TrainingDataError naming it."""
    version = store.current(task)
    if version is None:
        raise TrainingDataError(f"{where}: expected task {task!r} to have a published adapter, found none")
    try:
        artifact = decode_artifact(store.get(version), expected_fingerprint=backbone.fingerprint,
                                   limits=backbone.limits, arch=backbone.arch)
    except AdapterError as e:
        raise TrainingDataError(f"{where}: task {task!r}'s adapter cannot be used on this backbone: "
                                f"{e.message}") from None
    return version, artifact


def _run_subspace(spec: JobSpec, backbone: TrainingBackbone, store: AdapterStore,
                  progress: ProgressFn) -> TrainedAdapter:
    from prefixserve.training import ipt

    sources, num_tokens = [], None
    for i, source in enumerate(spec.sources):
        where = f"sources[{i}]"
        _, artifact = _published(backbone, store, source["task"], where)
        if artifact.kind != "prompt":
            raise TrainingDataError(f"{where}: expected task {source['task']!r} to hold a prompt-tuned adapter, "
                                    f"found kind {artifact.kind!r}")
        tokens = artifact.config["num_virtual_tokens"]
        if num_tokens is not None and tokens != num_tokens:
            raise TrainingDataError(f"{where}: expected {num_tokens} virtual tokens like sources[0], found "
                                    f"{tokens} in task {source['task']!r}")
        num_tokens = tokens
        source_spec = JobSpec(task=source["task"], kind="prompt", examples=tuple(source.get("examples", ())),
                              suite_task=source.get("suite_task"), eval_fraction=spec.eval_fraction,
                              hyperparameters=spec.hyperparameters, seed=spec.seed)
        train, eval_ = _encode(backbone, source_spec, job_data(source_spec), where=f"{where}.")
        sources.append(ipt.SubspaceSource(task=source["task"], soft_prompt=artifact.tensors["embeddings"].float(),
                                          train=train, eval=eval_))
    return ipt.train_subspace(backbone, sources, spec.hyperparameters, spec.seed, progress)


def _card(spec: JobSpec, data: JobData | None, baselines: BaselineScores | None, artifact: Artifact,
          metrics: dict[str, float]) -> dict:
    """What `GET /v1/tasks/{name}` shows of the version: how it was trained and how it compares with the
    plain backbone's baselines. Names no task (engine names carry the tenant) and keeps a subspace's
    aggregate metrics, not one per source, so its size does not grow with the job (MAX_CARD_BYTES)."""
    hp = {k: v for k, v in asdict(spec.hyperparameters).items() if v is not None and k != "subspace"}
    card = {"kind": spec.kind, "hyperparameters": hp, "seed": spec.seed,
            "num_parameters": sum(t.numel() for t in artifact.tensors.values()),
            "metrics": {name: value for name, value in metrics.items() if "/" not in name}}
    if data is None:
        card["num_sources"] = len(spec.sources)
    else:
        card |= {"num_train": len(data.train), "num_eval": len(data.eval), "suite_task": spec.suite_task,
                 "instruction_given": spec.instruction is not None}
    if baselines is not None:
        card |= {"best_baseline": baselines.best, "baselines_skipped": baselines.skipped}
    return card


def _check_result(backbone: TrainingBackbone, result: TrainedAdapter) -> Artifact:
    """The last gate before the worker publishes: the artifact is one the server accepts, metrics finite."""
    try:
        artifact = decode_artifact(result.artifact, expected_fingerprint=backbone.fingerprint,
                                   limits=backbone.limits, arch=backbone.arch)
    except AdapterError as e:
        raise TrainingFailedError(f"the trained adapter would be refused by the server: {e.message}") from None
    if artifact.kind != result.kind:
        raise TrainingFailedError(f"expected the trained artifact to be of kind {result.kind!r}, found "
                                  f"{artifact.kind!r}")
    bad = sorted(name for name, value in result.metrics.items() if not math.isfinite(value))
    if bad:
        raise TrainingFailedError(f"expected finite metrics from training, found NaN/Inf in {bad}")
    return artifact
