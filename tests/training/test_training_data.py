"""Training data: JSONL parsing, the prompt format and tokenization the engine shares, splits, collation,
and the bad data that must fail a job with an error naming the line or example."""

import json
import re

import pytest
import torch
from transformers import AutoTokenizer

from prefixserve.errors import TrainingDataError
from prefixserve.training.data import (
    IGNORE_INDEX,
    EncodedExample,
    collate,
    encode_examples,
    format_prompt,
    infer_labels,
    job_data,
    read_jsonl,
)
from prefixserve.training.spec import MAX_EXAMPLES, JobSpec

CHAT = {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital of France?"},
                     {"role": "assistant", "content": "Paris"}]}


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def jsonl(*rows) -> str:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"


def test_read_jsonl_file_and_text(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(jsonl({"input": "a", "output": "b"}, "", CHAT))
    assert read_jsonl(path) == [{"input": "a", "output": "b"}, CHAT]  # blank lines are skipped
    assert read_jsonl(path.read_text()) == read_jsonl(path)


@pytest.mark.parametrize("text, expected", [
    ("", "expected at least one example, found an empty file"),
    ("\n  \n", "expected at least one example, found an empty file"),
    (jsonl({"input": "a", "output": "b"}, '{"input": "a", "output": '), "line 2: expected one JSON object per line"),
    (jsonl({"input": "a", "output": "b"}, "[1, 2]"), "line 2: expected {'input', 'output'} or {'messages'}"),
    (jsonl({"input": "a", "output": "b"}, {"input": "a"}), "line 2: expected {'input', 'output'} or {'messages'}, "
                                                         "found ['input']"),
    (jsonl({"input": "a", "output": "   "}), "line 1: expected a non-empty 'output'"),
    (jsonl({"input": "a", "output": "b"}, "", {"messages": [{"role": "user", "content": "hi"},
                                                            {"role": "user", "content": "hello?"}]}),
     "line 3: expected the last message to be a non-empty assistant turn"),
])
def test_read_jsonl_errors_name_the_line(tmp_path, text, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    with pytest.raises(TrainingDataError, match="^" + re.escape(str(path))) as e:
        read_jsonl(path)
    assert expected in e.value.message


def test_read_jsonl_is_bounded_and_missing_file_is_clear(tmp_path):
    with pytest.raises(TrainingDataError, match=f"at most {MAX_EXAMPLES} examples"):
        read_jsonl(jsonl({"input": "a", "output": "b"}) * (MAX_EXAMPLES + 1))
    with pytest.raises(TrainingDataError, match="expected a readable JSONL file"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_prompt_tokens_match_the_engine_and_outputs_end_with_eos(tokenizer):
    [plain, chat] = encode_examples(tokenizer, [{"input": "great movie", "output": "positive "}, CHAT], 128)
    assert plain.prompt_ids == tokenizer(format_prompt("great movie")).input_ids  # what LLMEngine.make_request does
    assert format_prompt("great movie") == "great movie\nAnswer:"
    assert plain.output_text == " positive"
    assert plain.output_ids == tokenizer(" positive", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    text = tokenizer.apply_chat_template(CHAT["messages"][:-1], tokenize=False, add_generation_prompt=True)
    assert chat.prompt_ids == tokenizer(text, add_special_tokens=False).input_ids  # server/chat.py's chat_prompt_ids
    assert text.endswith("<|im_start|>assistant\n")
    assert chat.output_text == "Paris"
    assert chat.output_ids[-1] == tokenizer.eos_token_id


def test_too_long_example_names_its_index(tokenizer):
    examples = [{"input": "short", "output": "ok"}, {"input": "short", "output": "word " * 200}]
    with pytest.raises(TrainingDataError, match=r"examples\[1\]: expected prompt \+ output of at most max_length=64"):
        encode_examples(tokenizer, examples, max_length=64)


def test_collate_masks_prompt_and_padding():
    batch = collate([EncodedExample([5, 6, 7], [8, 2], " a"), EncodedExample([5], [9, 10, 2], " b")], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 9, 10, 2, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    m = IGNORE_INDEX
    assert batch["labels"].tolist() == [[m, m, m, 8, 2], [m, 9, 10, 2, m]]
    assert batch["labels"].dtype == torch.long


def inline_spec(n, **kwargs) -> JobSpec:
    examples = tuple({"input": f"x{i}", "output": "yes" if i % 2 else "no"} for i in range(n))
    return JobSpec(task="t/a", kind="prompt", examples=examples, **kwargs)


def test_inline_split_is_seeded_disjoint_and_complete():
    spec = inline_spec(20, eval_fraction=0.25, seed=3)
    data = job_data(spec)
    assert len(data.eval) == 5 and len(data.train) == 15
    assert sorted(e["input"] for e in data.train + data.eval) == sorted(e["input"] for e in spec.examples)
    assert job_data(spec) == data  # same seed, same split
    assert job_data(inline_spec(20, eval_fraction=0.25, seed=4)).eval != data.eval
    assert data.labels == ("no", "yes") and data.instruction is None


def test_inline_split_edge_cases():
    assert len(job_data(inline_spec(1, eval_fraction=0.0)).train) == 1
    with pytest.raises(TrainingDataError, match="at least 2 examples to split off an eval set"):
        job_data(inline_spec(1, eval_fraction=0.2))
    data = job_data(inline_spec(2, eval_fraction=0.9))
    assert len(data.train) == 1 and len(data.eval) == 1  # at least one example is left to train on
    explicit = ({"input": "e", "output": "yes"},)
    data = job_data(inline_spec(4, eval_examples=explicit))
    assert len(data.train) == 4 and data.eval == list(explicit)


def test_infer_labels_only_when_outputs_repeat():
    assert infer_labels([{"input": str(i), "output": f"out {i}"} for i in range(10)]) is None
    assert infer_labels([CHAT, CHAT]) is None


def test_suite_task_data():
    data = job_data(JobSpec(task="t/s", kind="prompt", suite_task="made_up_yes_no"))
    assert data.labels == ("yes", "no") and data.instruction
    assert len(data.train) == 256 and len(data.eval) == 64
    with pytest.raises(TrainingDataError, match="unknown task 'no_such_task'"):
        job_data(JobSpec(task="t/s", kind="prompt", suite_task="no_such_task"))
