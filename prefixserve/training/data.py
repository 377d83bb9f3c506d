"""Training data: where a job's examples come from, the one prompt format, and tokenization that
matches the serving engine token for token.

Prompt format (the choice every trainer, the evaluation and the tenant's requests share):
- {"input", "output"}: the prompt is `format_prompt(input)` = "{input}\\nAnswer:" sent as plain text
  (`/v1/generate` or `/v1/completions`), tokenized exactly as the engine does, `tokenizer(prompt)
  .input_ids`. The output is learned as " " + output.strip(): after "Answer:" a word starts with a
  space in BPE vocabularies, so " positive" is one natural token where "positive" would not be.
  A plain template rather than the chat template keeps prompts short (SmolLM2's template adds a
  ~20-token default system turn) and works for base models without a chat template.
- {"messages": [...]}: the prompt is the backbone's chat template over messages[:-1] with the
  generation prompt appended (what `/v1/chat/completions` sends); the output is the last (assistant)
  message's content.
The output is followed by the tokenizer's EOS token, which the engine stops on (it is always in
`Backbone.eos_token_ids`), so a trained task also learns to stop.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from prefixserve.errors import TrainingDataError
from prefixserve.training.spec import MAX_EXAMPLES, JobSpec, check_example

PROMPT_TEMPLATE = "{input}\nAnswer:"
IGNORE_INDEX = -100  # label of prompt and padding positions: no loss there
# Inline data counts as classification (label accuracy, label words for TEXT init) when its outputs
# repeat: at most this many distinct outputs, each seen twice on average.
MAX_INFERRED_LABELS = 16


def format_prompt(input_text: str) -> str:
    """The text prompt of an {"input", "output"} example, as a tenant sends it to the server."""
    return PROMPT_TEMPLATE.format(input=input_text)


def output_text(example: dict) -> str:
    """What the model learns to generate for an example (before EOS)."""
    if "messages" in example:
        return example["messages"][-1]["content"]
    return " " + example["output"].strip()


def prompt_ids(tokenizer, example: dict) -> list[int]:
    """The prompt token ids exactly as the engine builds them for this example's request."""
    if "messages" not in example:
        return list(tokenizer(format_prompt(example["input"])).input_ids)
    if not getattr(tokenizer, "chat_template", None):
        raise TrainingDataError("expected a backbone with a chat template for {'messages'} examples, found none; "
                                "use {'input', 'output'} examples")
    # Same as server/chat.py's chat_prompt_ids: the template writes the special tokens itself.
    text = tokenizer.apply_chat_template(example["messages"][:-1], tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False).input_ids)


@dataclass(frozen=True)
class EncodedExample:
    prompt_ids: list[int]
    output_ids: list[int]  # output tokens + EOS
    output_text: str  # the reference output (before EOS), as learned

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)


def encode_examples(tokenizer, examples: list[dict], max_length: int, where: str = "examples") -> list[EncodedExample]:
    """Tokenize examples; TrainingDataError names the first one that does not fit `max_length` tokens
    (prompt + output + EOS) or whose output tokenizes to nothing."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TrainingDataError("expected a tokenizer with an EOS token (outputs are trained to end with it), "
                                "found none")
    encoded = []
    for i, example in enumerate(examples):
        check_example(example, f"{where}[{i}]")
        text = output_text(example)
        output = list(tokenizer(text, add_special_tokens=False).input_ids)
        if not output:
            raise TrainingDataError(f"{where}[{i}]: expected an output of at least one token, found {text!r:.80}")
        item = EncodedExample(prompt_ids(tokenizer, example), output + [eos], text)
        if item.num_tokens > max_length:
            raise TrainingDataError(f"{where}[{i}]: expected prompt + output of at most max_length={max_length} "
                                    f"tokens, found {len(item.prompt_ids)} + {len(item.output_ids)} (with EOS)")
        encoded.append(item)
    return encoded


@dataclass(frozen=True)
class JobData:
    train: list[dict]
    eval: list[dict]
    instruction: str | None  # the job's or suite task's instruction: a baseline, and TEXT init of soft prompts
    labels: tuple[str, ...] | None  # class label words of a classification task, else None


def job_data(spec: JobSpec) -> JobData:
    """The job's train/eval examples: a suite task's fixed splits, or the inline examples split by
    `eval_fraction` with a shuffle seeded by `spec.seed` (unless `eval_examples` are given)."""
    if spec.suite_task is not None:
        from prefixserve.training.tasks import build_task  # the suite pulls in word lists: only when used

        task = build_task(spec.suite_task, seed=spec.seed)
        return JobData(list(task.train), list(task.eval), spec.instruction or task.instruction, task.labels)
    examples = list(spec.examples)
    if not examples:
        raise TrainingDataError("expected training data: 'examples' or 'suite_task', found neither")
    if spec.eval_examples:
        train, eval_ = examples, list(spec.eval_examples)
    elif spec.eval_fraction == 0:
        train, eval_ = examples, []
    else:
        if len(examples) < 2:
            raise TrainingDataError(f"expected at least 2 examples to split off an eval set (eval_fraction="
                                    f"{spec.eval_fraction}), found {len(examples)}; pass eval_fraction 0 or more data")
        order = list(range(len(examples)))
        random.Random(spec.seed).shuffle(order)
        num_eval = min(len(examples) - 1, max(1, round(spec.eval_fraction * len(examples))))
        eval_ = [examples[i] for i in sorted(order[:num_eval])]
        train = [examples[i] for i in sorted(order[num_eval:])]
    return JobData(train, eval_, spec.instruction, infer_labels(examples))


def infer_labels(examples: list[dict]) -> tuple[str, ...] | None:
    """Inline {"input", "output"} data whose outputs repeat is treated as classification over them."""
    if not examples or any("output" not in e for e in examples):
        return None
    labels = sorted({e["output"].strip() for e in examples})
    if len(labels) > MAX_INFERRED_LABELS or 2 * len(labels) > len(examples):
        return None
    return tuple(labels)


def read_jsonl(source: Path | str) -> list[dict]:
    """Examples from a JSONL file (a Path) or JSONL text (a str), one example per line; blank lines are
    skipped. TrainingDataError names the line of anything that is not an example."""
    if isinstance(source, Path):
        try:
            with source.open(encoding="utf-8") as f:
                return _parse_lines(f, str(source))
        except OSError as e:
            raise TrainingDataError(f"expected a readable JSONL file at {str(source)!r}, found: {e}") from None
        except UnicodeDecodeError as e:
            raise TrainingDataError(f"expected a UTF-8 JSONL file at {str(source)!r}, found: {e}") from None
    return _parse_lines(source.splitlines(), "the JSONL text")


def _parse_lines(lines, name: str) -> list[dict]:
    examples = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        if len(examples) == MAX_EXAMPLES:
            raise TrainingDataError(f"{name}: expected at most {MAX_EXAMPLES} examples, found more (line {number})")
        try:
            example = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainingDataError(f"{name} line {number}: expected one JSON object per line, found invalid JSON "
                                    f"({e.msg} at column {e.colno}): {line.strip()!r:.80}") from None
        check_example(example, f"{name} line {number}")
        examples.append(example)
    if not examples:
        raise TrainingDataError(f"{name}: expected at least one example, found an empty file")
    return examples


def collate(batch: list[EncodedExample], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a training/eval forward: the loss is taken on output tokens only."""
    length = max(e.num_tokens for e in batch)
    input_ids = torch.full((len(batch), length), pad_id, dtype=torch.long)  # [B, T]
    attention_mask = torch.zeros((len(batch), length), dtype=torch.long)  # [B, T]
    labels = torch.full((len(batch), length), IGNORE_INDEX, dtype=torch.long)  # [B, T]
    for row, e in enumerate(batch):
        ids = e.prompt_ids + e.output_ids
        input_ids[row, :len(ids)] = torch.tensor(ids)
        attention_mask[row, :len(ids)] = 1
        labels[row, len(e.prompt_ids):len(ids)] = torch.tensor(e.output_ids)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
