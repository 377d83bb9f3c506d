"""What a training job is: the spec a tenant submits, its hyperparameters, progress events and result.

Everything here is plain data with strict validation, shared by the HTTP API (which validates a
submission before queueing it), the job queues (which store `JobSpec.to_dict()` as JSON), the
worker and the trainers. A spec that passes `parse_job_spec` names a kind we train, bounded sizes
and hyperparameters in range; whether its examples fit the backbone's context is checked when the
worker tokenizes them."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace

from prefixserve.errors import TrainingDataError

TRAINABLE_KINDS = ("prefix", "prompt", "ptuning", "lora", "ia3", "bitfit", "adapter", "subspace", "intrinsic")
# Bounds on one job: a job is a few hundred to a few thousand short examples, trained on one GPU or CPU.
MAX_EXAMPLES = 20_000
MAX_EXAMPLE_CHARS = 8_192
MAX_STEPS = 100_000
MAX_SOURCES = 256
MAX_INSTRUCTION_CHARS = 2_048
# BottleneckKind's PLACEMENTS and ACTIVATIONS, repeated: the kinds import torch, which this module (and the SDK's
# training_protocol) does without. tests/training/test_job_spec.py holds them equal.
BOTTLENECK_PLACEMENTS = ("attention", "mlp")
BOTTLENECK_ACTIVATIONS = ("gelu", "relu", "silu", "tanh")
MAX_BOTTLENECK_SIZE = 64  # AdapterLimits.max_bottleneck_size's default; a server may allow less


# The rates task_quality measured on the suite (benchmarks/RESULTS.md). They differ by orders of magnitude:
# a soft prompt wants large steps; a prefix started from real keys and values is wrecked by them (longer_word:
# 0.88 exact match at 1e-3, 0.00 at 3e-3); Adam moves every decoder weight of a subspace by ~lr a step.
# ia3 (SmolLM2-135M, 2026-12-04; task_quality in RESULTS.md): word_size, 100 steps of batch 8, 256 train / 64 eval,
# peft's targets: 0.92 exact match at 3e-3 (T-Few's rate, over 1000 steps), 0.97 at 1e-2, 1.00 at 3e-2.
# bitfit (the same model, task, split and steps, 2026-12-04, not in RESULTS.md yet), all seven projections:
# 0.92 exact match at 1e-3, 0.94 at 3e-3, 0.98 at 1e-2 (the largest rate tried).
DEFAULT_LEARNING_RATES = {"prompt": 0.1, "ptuning": 3e-2, "prefix": 1e-3, "lora": 3e-3, "subspace": 1e-3,
                          "intrinsic": 0.1, "ia3": 3e-2, "bitfit": 1e-2, "adapter": 1e-3}
# (warm-up as a fraction of the steps, decay) where it was measured to matter: a prefix's MLP at a constant
# rate spiked and fell back to the majority answer on first_letter (0.05 exact match) and word_temperature
# (0.50); a fifth of the steps warming up and a cosine decay gave 0.97 and 0.98 (RESULTS.md, 2026-12-03).
DEFAULT_SCHEDULES = {"prefix": (0.2, "cosine")}


@dataclass(frozen=True)
class Hyperparameters:
    """Defaults suit a few hundred short examples on SmolLM2-135M; every kind reads only its own fields."""

    steps: int = 200
    learning_rate: float | None = None  # None: the kind's DEFAULT_LEARNING_RATES entry (see with_kind_defaults)
    batch_size: int = 8
    max_length: int = 128  # prompt + output tokens of one example; longer examples fail the job
    eval_max_new_tokens: int = 16
    eval_every: int = 0  # steps between progress evals (0: only at the end)
    # prefix / prompt / ptuning / lora / ia3 / bitfit / adapter: the rate rises linearly over `warmup_steps`, then stays
    # ("constant") or follows a cosine to a tenth of it by the last step ("cosine"). None: the kind's
    # (DEFAULT_SCHEDULES).
    warmup_steps: int | None = None
    decay: str | None = None
    # prefix / prompt / ptuning / subspace / intrinsic
    num_virtual_tokens: int = 8
    # prompt / prefix: "text" (from init_text, else the task's instruction/label words: a soft prompt of
    # their embeddings, a prefix of their keys and values) or "random"
    init: str = "text"
    init_text: str | None = None
    encoder: str = "mlp"  # ptuning: "mlp" or "lstm"
    encoder_hidden: int = 128  # prefix projection / ptuning encoder width
    # lora
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q_proj", "v_proj")
    # ia3: the projections whose output a learned vector scales; a `feedforward` one has its input scaled
    # instead. peft's own defaults for Llama (TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING and
    # ..._FEEDFORWARD_MODULES_MAPPING in peft.utils.constants): keys, values, and the input of the MLP's down_proj.
    ia3_targets: tuple[str, ...] = ("k_proj", "v_proj", "down_proj")
    ia3_feedforward: tuple[str, ...] = ("down_proj",)
    # bitfit: the projections whose output a learned bias shifts. BitFit trains every bias of the model, and a
    # Llama has one place for one per projection (LORA_TARGETS), so all seven.
    bitfit_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # adapter (bottleneck adapters): `bottleneck_size` units after each of `bottleneck_placements` in every layer.
    # Both placements are Houlsby's, ("mlp",) Pfeiffer's.
    bottleneck_size: int = 16
    bottleneck_placements: tuple[str, ...] = BOTTLENECK_PLACEMENTS
    bottleneck_activation: str = "relu"
    # IPT (arXiv 2110.07867): MSF trains a subspace from prompt-tuned `sources`; IST trains z in `subspace`
    intrinsic_dim: int = 5
    decoder_hidden: int = 256
    mse_weight: float = 200.0  # the paper's alpha on MSE(reconstruction, original prompt)
    subspace: str | None = None  # intrinsic: the engine task name of a published subspace artifact

    def with_kind_defaults(self, kind: str) -> Hyperparameters:
        """These hyperparameters with `kind`'s default learning rate and schedule where none was given
        (call it once `steps` is final: a default warm-up is a fraction of them)."""
        warmup_fraction, decay = DEFAULT_SCHEDULES.get(kind, (0.0, "constant"))
        return replace(
            self,
            learning_rate=DEFAULT_LEARNING_RATES[kind] if self.learning_rate is None else self.learning_rate,
            warmup_steps=round(warmup_fraction * self.steps) if self.warmup_steps is None else self.warmup_steps,
            decay=decay if self.decay is None else self.decay)


@dataclass(frozen=True)
class JobSpec:
    """One training job. `task` is the engine task name it publishes to ("<tenant>/<task>"); data is
    either inline `examples` or a built-in `suite_task` (prefixserve.training.tasks). A subspace job
    (IPT's MSF) has no data of its own: it trains on its `sources`, each a published prompt task
    with that task's data: {"task": <engine task name>, "examples": [...]} or {"task", "suite_task"}."""

    task: str
    kind: str
    examples: tuple[dict, ...] = ()  # {"input", "output"} or {"messages": [...]}
    suite_task: str | None = None
    eval_examples: tuple[dict, ...] = ()  # explicit eval split; else `eval_fraction` of examples
    eval_fraction: float = 0.2
    hyperparameters: Hyperparameters = field(default_factory=Hyperparameters)
    seed: int = 0
    sources: tuple[dict, ...] = ()  # subspace jobs only
    # What the tenant would otherwise write in the prompt: scored as a baseline, and TEXT init of soft prompts.
    instruction: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ProgressEvent:
    """Reported by trainers while they run; the queue keeps the latest for the API."""

    step: int
    total_steps: int
    loss: float
    eta_s: float | None = None
    eval_metrics: dict[str, float] | None = None  # e.g. {"exact_match": 0.9, "eval_loss": 0.4}


ProgressFn = Callable[[ProgressEvent], None]


@dataclass(frozen=True)
class TrainedAdapter:
    """A finished job's product: artifact bytes ready for `store.put(task, artifact, kind)`."""

    artifact: bytes
    kind: str  # the artifact's kind: ptuning publishes "prompt" (its encoder output), IPT "subspace"/"intrinsic"
    metrics: dict[str, float]  # final train loss, eval loss, exact match / label accuracy, the baselines'
    card: dict | None = None  # the task card published with the version (run_job fills it in)


def parse_job_spec(raw: object) -> JobSpec:
    """Validate a submitted spec (JSON-decoded) into a JobSpec; TrainingDataError says what is wrong."""
    if not isinstance(raw, dict):
        raise TrainingDataError(f"expected a job spec object, found {type(raw).__name__}")
    known = {f.name for f in fields(JobSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TrainingDataError(f"expected job spec fields among {sorted(known)}, found unknown {unknown}")
    task = raw.get("task")
    if not isinstance(task, str) or not task:
        raise TrainingDataError(f"expected 'task' to be a non-empty task name, found {task!r:.80}")
    kind = raw.get("kind")
    if kind not in TRAINABLE_KINDS:
        raise TrainingDataError(f"expected 'kind' among {list(TRAINABLE_KINDS)}, found {kind!r:.80}")
    examples = _examples(raw.get("examples", ()), "examples")
    eval_examples = _examples(raw.get("eval_examples", ()), "eval_examples")
    suite_task = raw.get("suite_task")
    if suite_task is not None and not isinstance(suite_task, str):
        raise TrainingDataError(f"expected 'suite_task' to be a task suite name, found {suite_task!r:.80}")
    hp = _hyperparameters(raw.get("hyperparameters", {})).with_kind_defaults(kind)
    sources = _sources(raw.get("sources", ()))
    if kind == "subspace":
        if not sources or examples or suite_task:
            raise TrainingDataError(f"expected a subspace job to have 'sources' (the prompt tasks it is trained "
                                    f"from, with their data) and no examples/suite_task of its own, found "
                                    f"{len(sources)} sources")
    elif sources:
        raise TrainingDataError(f"expected 'sources' only for kind 'subspace', found them for kind {kind!r}")
    elif examples and suite_task:
        raise TrainingDataError("expected either 'examples' or 'suite_task', found both")
    elif not examples and not suite_task:
        raise TrainingDataError("expected training data: 'examples' (a non-empty list) or 'suite_task', found neither")
    if kind == "ia3":
        check_ia3_targets(hp)
    if kind == "bitfit":
        check_bitfit_targets(hp)
    if kind == "adapter":
        check_bottleneck(hp)
    if kind == "intrinsic" and not hp.subspace:
        raise TrainingDataError("expected hyperparameters.subspace to name the subspace task an intrinsic task "
                                "is decoded by, found none")
    eval_fraction = raw.get("eval_fraction", 0.2)
    if not _is_number(eval_fraction) or not 0.0 <= eval_fraction < 1.0:
        raise TrainingDataError(f"expected 'eval_fraction' in [0, 1), found {eval_fraction!r:.80}")
    instruction = raw.get("instruction")
    if instruction is not None and (not isinstance(instruction, str) or not instruction.strip()
                                    or len(instruction) > MAX_INSTRUCTION_CHARS):
        raise TrainingDataError(f"expected 'instruction' to be non-empty text of at most {MAX_INSTRUCTION_CHARS} "
                                f"characters, found {instruction!r:.80}")
    if instruction is not None and kind == "subspace":
        raise TrainingDataError("expected no 'instruction' for a subspace job (its sources carry their own data)")
    seed = raw.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**63:
        raise TrainingDataError(f"expected 'seed' to be a non-negative integer, found {seed!r:.80}")
    return JobSpec(task=task, kind=kind, examples=examples, suite_task=suite_task, eval_examples=eval_examples,
                   eval_fraction=float(eval_fraction), hyperparameters=hp, seed=seed, sources=sources,
                   instruction=instruction)


def check_suite_tasks(spec: JobSpec) -> None:
    """Refuse an unknown built-in task now rather than in the worker. The suite needs the training
    extra; a server without it leaves the check to the worker."""
    names = [spec.suite_task] + [s["suite_task"] for s in spec.sources if "suite_task" in s]
    names = [n for n in names if n is not None]
    if not names:
        return
    try:
        from prefixserve.training.tasks import TASK_NAMES
    except ImportError:
        return
    unknown = [n for n in names if n not in TASK_NAMES]
    if unknown:
        raise TrainingDataError(f"expected suite tasks among {list(TASK_NAMES)}, found {unknown}")


def _sources(raw: object) -> tuple[dict, ...]:
    if not isinstance(raw, list | tuple) or len(raw) > MAX_SOURCES:
        raise TrainingDataError(f"expected 'sources' to be a list of at most {MAX_SOURCES} objects, found "
                                f"{raw!r:.80}")
    for i, source in enumerate(raw):
        if (not isinstance(source, dict) or not isinstance(source.get("task"), str) or not source["task"]
                or set(source) not in ({"task", "examples"}, {"task", "suite_task"})):
            found = sorted(source) if isinstance(source, dict) else type(source).__name__
            raise TrainingDataError(f"sources[{i}]: expected {{'task', 'examples'}} or {{'task', 'suite_task'}}, "
                                    f"found {found}")
        if "examples" in source:
            if not source["examples"]:
                raise TrainingDataError(f"sources[{i}]: expected a non-empty list of examples, found none")
            _examples(source["examples"], f"sources[{i}].examples")
        elif not isinstance(source["suite_task"], str):
            raise TrainingDataError(f"sources[{i}]: expected 'suite_task' to be a name, found "
                                    f"{source['suite_task']!r:.80}")
    return tuple(raw)


def _examples(raw: object, name: str) -> tuple[dict, ...]:
    """Shape checks only (each example is an input/output pair or a chat); the tokenizer checks lengths."""
    if not isinstance(raw, list | tuple):
        raise TrainingDataError(f"expected '{name}' to be a list of examples, found {type(raw).__name__}")
    if len(raw) > MAX_EXAMPLES:
        raise TrainingDataError(f"expected at most {MAX_EXAMPLES} {name}, found {len(raw)}")
    for i, example in enumerate(raw):
        check_example(example, f"{name}[{i}]")
    return tuple(raw)


def check_example(example: object, where: str) -> None:
    """One example: {"input": str, "output": str} or {"messages": [{"role", "content"}, ...]} ending
    with an assistant turn (the output the loss is taken on)."""
    if isinstance(example, dict) and set(example) == {"input", "output"}:
        for key in ("input", "output"):
            value = example[key]
            if not isinstance(value, str) or len(value) > MAX_EXAMPLE_CHARS:
                raise TrainingDataError(f"{where}: expected '{key}' to be a string of at most {MAX_EXAMPLE_CHARS} "
                                        f"characters, found {value!r:.80}")
        if not example["output"].strip():
            raise TrainingDataError(f"{where}: expected a non-empty 'output', found {example['output']!r}")
        return
    if isinstance(example, dict) and set(example) == {"messages"}:
        messages = example["messages"]
        if (not isinstance(messages, list) or len(messages) < 2 or not all(
                isinstance(m, dict) and set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                and isinstance(m["content"], str) and len(m["content"]) <= MAX_EXAMPLE_CHARS for m in messages)):
            raise TrainingDataError(f"{where}: expected 'messages' to be a list of at least two "
                                    f"{{'role': system|user|assistant, 'content': str}} objects, found "
                                    f"{messages!r:.120}")
        if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
            raise TrainingDataError(f"{where}: expected the last message to be a non-empty assistant turn (the "
                                    f"output to learn), found role {messages[-1]['role']!r}")
        return
    found = sorted(example) if isinstance(example, dict) else type(example).__name__
    raise TrainingDataError(f"{where}: expected {{'input', 'output'}} or {{'messages'}}, found {found}")


_HP_RULES: dict[str, tuple[type | tuple[type, ...], Callable[[object], bool], str]] = {
    "steps": (int, lambda v: 1 <= v <= MAX_STEPS, f"1..{MAX_STEPS}"),
    "learning_rate": ((int, float), lambda v: 0 < v <= 10 and math.isfinite(v), "in (0, 10]"),
    "batch_size": (int, lambda v: 1 <= v <= 1024, "1..1024"),
    "max_length": (int, lambda v: 2 <= v <= 32_768, "2..32768"),
    "eval_max_new_tokens": (int, lambda v: 1 <= v <= 512, "1..512"),
    "eval_every": (int, lambda v: 0 <= v <= MAX_STEPS, f"0..{MAX_STEPS}"),
    "warmup_steps": ((int, type(None)), lambda v: v is None or 0 <= v <= MAX_STEPS, f"0..{MAX_STEPS} or null"),
    "decay": ((str, type(None)), lambda v: v in (None, "constant", "cosine"), "'constant', 'cosine' or null"),
    "num_virtual_tokens": (int, lambda v: 1 <= v <= 512, "1..512"),
    "init": (str, lambda v: v in ("text", "random"), "'text' or 'random'"),
    "init_text": ((str, type(None)), lambda v: v is None or 0 < len(v) <= MAX_EXAMPLE_CHARS, "a non-empty string"),
    "encoder": (str, lambda v: v in ("mlp", "lstm"), "'mlp' or 'lstm'"),
    "encoder_hidden": (int, lambda v: 1 <= v <= 16_384, "1..16384"),
    "rank": (int, lambda v: 1 <= v <= 256, "1..256"),
    "alpha": ((int, float), lambda v: math.isfinite(v) and v > 0, "a positive number"),
    "targets": ((list, tuple), lambda v: 0 < len(v) <= 7 and all(isinstance(t, str) for t in v),
                "a non-empty list of projection names"),
    "ia3_targets": ((list, tuple), lambda v: 0 < len(v) <= 7 and _distinct_names(v),
                    "a non-empty list of distinct projection names"),
    "ia3_feedforward": ((list, tuple), lambda v: len(v) <= 7 and _distinct_names(v),
                        "a list of distinct projection names (some of ia3_targets)"),
    "bitfit_targets": ((list, tuple), lambda v: 0 < len(v) <= 7 and _distinct_names(v),
                       "a non-empty list of distinct projection names"),
    "bottleneck_size": (int, lambda v: 1 <= v <= MAX_BOTTLENECK_SIZE, f"1..{MAX_BOTTLENECK_SIZE}"),
    # sorted, as the artifact's config lists them, so the card's hyperparameters read as the artifact does
    "bottleneck_placements": ((list, tuple), lambda v: _distinct_names(v) and len(v) > 0 and list(v) == sorted(v)
                              and set(v) <= set(BOTTLENECK_PLACEMENTS),
                              f"a non-empty sorted list of distinct placements among {list(BOTTLENECK_PLACEMENTS)}"),
    "bottleneck_activation": (str, lambda v: v in BOTTLENECK_ACTIVATIONS,
                              "one of " + ", ".join(repr(a) for a in BOTTLENECK_ACTIVATIONS)),
    "intrinsic_dim": (int, lambda v: 1 <= v <= 1024, "1..1024"),
    "decoder_hidden": (int, lambda v: 1 <= v <= 16_384, "1..16384"),
    "mse_weight": ((int, float), lambda v: math.isfinite(v) and v >= 0, "a non-negative number"),
    "subspace": ((str, type(None)), lambda v: v is None or len(v) > 0, "a task name"),
}


def _hyperparameters(raw: object) -> Hyperparameters:
    if not isinstance(raw, dict):
        raise TrainingDataError(f"expected 'hyperparameters' to be an object, found {type(raw).__name__}")
    unknown = sorted(set(raw) - set(_HP_RULES))
    if unknown:
        raise TrainingDataError(f"expected hyperparameters among {sorted(_HP_RULES)}, found unknown {unknown}")
    values = {}
    for name, value in raw.items():
        _check_rule(name, value)
        values[name] = tuple(value) if isinstance(value, list) else value
    return Hyperparameters(**values)


def _check_rule(name: str, value: object) -> None:
    types, ok, expected = _HP_RULES[name]
    # bool is an int in Python; `steps: true` is a client bug, not 1
    if isinstance(value, bool) or not isinstance(value, types) or not ok(value):
        raise TrainingDataError(f"expected hyperparameters.{name} {expected}, found {value!r:.80}")


def _distinct_names(value: list | tuple) -> bool:
    return all(isinstance(v, str) for v in value) and len(set(value)) == len(value)


def check_ia3_targets(hp: Hyperparameters) -> None:
    """An ia3 job's projections are ones the server scales, its feedforward ones among them (peft refuses
    the rest only once the job runs)."""
    _check_projections(hp, "ia3_targets")
    _check_projections(hp, "ia3_feedforward", may_be_empty=True)
    outside = [t for t in hp.ia3_feedforward if t not in hp.ia3_targets]
    if outside:
        default = list(Hyperparameters.ia3_feedforward)
        raise TrainingDataError(f"expected hyperparameters.ia3_feedforward to be among ia3_targets "
                                f"{list(hp.ia3_targets)}, found {outside} outside them (its default is {default}; "
                                f"[] scales only outputs)")


def check_bitfit_targets(hp: Hyperparameters) -> None:
    """A bitfit job's projections are ones the server shifts (the trainer hooks exactly these)."""
    _check_projections(hp, "bitfit_targets")


def check_bottleneck(hp: Hyperparameters, max_size: int | None = None) -> None:
    """An adapter job's bottlenecks are ones the server applies: _HP_RULES' checks again (a Hyperparameters
    built in code has not been through them), and a size within the server's `max_size` where it is known."""
    for name in ("bottleneck_size", "bottleneck_placements", "bottleneck_activation"):
        _check_rule(name, getattr(hp, name))
    if max_size is not None and hp.bottleneck_size > max_size:
        raise TrainingDataError(f"expected hyperparameters.bottleneck_size of at most {max_size} (the server's "
                                f"limit), found {hp.bottleneck_size}")


def _check_projections(hp: Hyperparameters, name: str, may_be_empty: bool = False) -> None:
    """hp.<name> names at least one projection (unless `may_be_empty`), each one the server adapts
    (LORA_TARGETS). _HP_RULES checks only that they are distinct strings, and a Hyperparameters built in
    code has not been through even that."""
    # Imported here: kinds imports torch, which `prefixserve --help` (it imports this module) does without.
    from prefixserve.adapters_store.kinds import LORA_TARGETS

    names = getattr(hp, name)
    if not names and not may_be_empty:
        raise TrainingDataError(f"expected hyperparameters.{name} to name at least one projection, found []")
    unknown = [t for t in names if t not in LORA_TARGETS]
    if unknown:
        raise TrainingDataError(f"expected hyperparameters.{name} among {list(LORA_TARGETS)}, found {unknown}")


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
