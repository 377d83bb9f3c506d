"""What a tenant could do instead of training a task, scored exactly like the trained task.

A trained adapter is only worth its job if it beats the alternatives a user already has with the
plain backbone, so every job's metrics carry them (prefixed with their name) and the lift over the
best one:

- zero_shot: the bare prompt, as the task's requests send it.
- instruction: the task's instruction written in front of the prompt (suite tasks have one; a job
  may name one with `instruction`). Absent when there is none.
- k_shot: the instruction (if any) and K_SHOT training examples in the prompt, in the prompt format
  the task uses; the examples are picked to cover distinct outputs first, as a careful user would.
- majority: always answering the training split's most common output.

The in-context baselines are decoded as a user would call the server for them: with a stop at the
first newline (`stop=["\\n"]`) when no reference output spans lines, since the plain backbone goes
on writing the next "Input ... Answer:" block after its answer instead of emitting EOS. A prompt
that no longer fits the backbone's context after the examples are added drops the baseline (and
says so in `skipped`), never the job."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from prefixserve.errors import TrainingDataError
from prefixserve.training.backbone import TrainingBackbone
from prefixserve.training.data import JobData, encode_examples, format_prompt, output_text
from prefixserve.training.evaluate import evaluate

K_SHOT = 4
BASELINES = ("zero_shot", "instruction", "k_shot", "majority")


@dataclass(frozen=True)
class BaselineScores:
    metrics: dict[str, float]  # "<baseline>_exact_match" (and _label_accuracy, _eval_loss where measured)
    best: str  # the baseline with the highest exact match (ties: the earlier in BASELINES)
    skipped: dict[str, str]  # baseline -> why it was not measured

    @property
    def best_exact_match(self) -> float:
        return self.metrics[f"{self.best}_exact_match"]


def score_baselines(backbone: TrainingBackbone, data: JobData, max_new_tokens: int) -> BaselineScores:
    """Every baseline on `data.eval` with the plain backbone (call it with no adapter attached)."""
    if not data.eval:
        raise TrainingDataError("expected an eval split to score baselines on, found none")
    multiline = any("\n" in output_text(e).strip() for e in data.eval)
    stop = None if multiline else "\n"
    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    demos = pick_demonstrations(data.train, K_SHOT)
    prompts = {"zero_shot": data.eval,
               "instruction": [with_context(e, data.instruction, []) for e in data.eval] if data.instruction else None,
               "k_shot": [with_context(e, data.instruction, demos) for e in data.eval] if demos else None}
    for name, examples in prompts.items():
        if examples is None:
            skipped[name] = "the job has no instruction" if name == "instruction" else "no training examples"
            continue
        try:
            encoded = encode_examples(backbone.tokenizer, examples, backbone.max_model_len, f"{name} baseline")
        except TrainingDataError as e:
            skipped[name] = e.message
            continue
        scores = evaluate(backbone.model, backbone.tokenizer, encoded, max_new_tokens, data.labels,
                          eos_token_ids=backbone.eos_token_ids, stop=None if name == "zero_shot" else stop)
        metrics |= {f"{name}_{metric}": value for metric, value in scores.items() if metric != "num_eval"}
    majority = majority_output(data.train)
    if majority is None:
        skipped["majority"] = "no training examples"
    else:
        references = [output_text(e).strip() for e in data.eval]
        metrics["majority_exact_match"] = sum(r == majority for r in references) / len(references)
        if data.labels:
            metrics["majority_label_accuracy"] = metrics["majority_exact_match"]
    measured = [name for name in BASELINES if f"{name}_exact_match" in metrics]
    best = max(measured, key=lambda name: (metrics[f"{name}_exact_match"], -BASELINES.index(name)))
    return BaselineScores(metrics, best, skipped)


def pick_demonstrations(train: list[dict], k: int) -> list[dict]:
    """Up to k training examples, first one per distinct output (in training order), then the rest."""
    chosen, seen = [], set()
    for example in train:
        key = output_text(example).strip()
        if key not in seen:
            seen.add(key)
            chosen.append(example)
        if len(chosen) == k:
            return chosen
    rest = [e for e in train if not any(e is c for c in chosen)]
    return chosen + rest[:k - len(chosen)]


def with_context(example: dict, instruction: str | None, demos: list[dict]) -> dict:
    """The example with the instruction and demonstrations in its prompt, in the example's own format."""
    if "messages" in example:
        messages = [m for d in demos if "messages" in d for m in d["messages"] if m["role"] != "system"]
        own = example["messages"]
        if instruction:
            if own[0]["role"] == "system":
                own = [{"role": "system", "content": f"{instruction}\n\n{own[0]['content']}"}, *own[1:]]
            else:
                own = [{"role": "system", "content": instruction}, *own]
        head = own[:1] if own[0]["role"] == "system" else []
        return {"messages": [*head, *messages, *own[len(head):]]}
    shots = "".join(f"{format_prompt(d['input'])}{output_text(d)}\n\n" for d in demos if "input" in d)
    return {"input": f"{instruction}\n\n{shots}{example['input']}" if instruction else shots + example["input"],
            "output": example["output"]}


def majority_output(train: list[dict]) -> str | None:
    """The most common training output (ties: the first seen), as compared after stripping."""
    counts = Counter(output_text(e).strip() for e in train)
    return counts.most_common(1)[0][0] if counts else None
