"""The baselines a trained task is compared with: the prompts they send, what they score and when one
is skipped rather than failing the job (tiny Llama with SmolLM2's real tokenizer)."""

import dataclasses

import pytest

from prefixserve.errors import TrainingDataError
from prefixserve.training.baselines import (
    BASELINES,
    majority_output,
    pick_demonstrations,
    score_baselines,
    with_context,
)
from prefixserve.training.data import JobData, encode_examples, format_prompt
from prefixserve.training.evaluate import _cut, evaluate, predict

TRAIN = [{"input": f"word {w}", "output": o} for w, o in [("apple", "yes"), ("pear", "yes"), ("sky", "no"),
                                                           ("grass", "yes"), ("mud", "maybe")]]
EVAL = [{"input": "word snow", "output": "no"}, {"input": "word leaf", "output": "yes"},
        {"input": "word rain", "output": "yes"}]


def chat(user, assistant, system=None):
    head = [{"role": "system", "content": system}] if system else []
    return {"messages": [*head, {"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def test_demonstrations_cover_distinct_outputs_first_then_follow_training_order():
    assert pick_demonstrations(TRAIN, 3) == [TRAIN[0], TRAIN[2], TRAIN[4]]
    assert pick_demonstrations(TRAIN, 4) == [TRAIN[0], TRAIN[2], TRAIN[4], TRAIN[1]]
    assert pick_demonstrations(TRAIN[:2], 4) == TRAIN[:2]
    assert pick_demonstrations([], 4) == []


def test_majority_is_the_most_common_training_output_ties_to_the_first_seen():
    assert majority_output(TRAIN) == "yes"
    assert majority_output([TRAIN[2], TRAIN[0]]) == "no"
    assert majority_output([chat("a", " b "), chat("c", "d"), chat("e", "b")]) == "b"
    assert majority_output([]) is None


def test_in_context_prompt_of_input_output_examples_is_what_a_user_would_send():
    example = with_context(EVAL[0], "Answer yes or no.", TRAIN[:2])
    assert example == {"input": "Answer yes or no.\n\n" + format_prompt("word apple") + " yes\n\n"
                                + format_prompt("word pear") + " yes\n\nword snow", "output": "no"}
    assert format_prompt(example["input"]).endswith(format_prompt("word snow"))  # the request's own format last
    assert with_context(EVAL[0], None, []) == EVAL[0]


def test_in_context_prompt_of_chats_puts_the_instruction_in_the_system_turn():
    demos = [chat("word sky", "no", system="ignored demo system"), chat("word apple", "yes")]
    own = chat("word snow", "no")
    assert with_context(own, "Answer yes or no.", demos)["messages"] == [
        {"role": "system", "content": "Answer yes or no."},
        *demos[0]["messages"][1:], *demos[1]["messages"], *own["messages"]]
    with_system = chat("word snow", "no", system="Be brief.")
    assert with_context(with_system, "Answer yes or no.", [])["messages"][0] == {
        "role": "system", "content": "Answer yes or no.\n\nBe brief."}
    assert with_context(own, None, demos[1:])["messages"] == [*demos[1]["messages"], *own["messages"]]


def test_cut_ends_the_answer_at_the_first_stop_after_some_text():
    assert _cut(" yes\n\nInput: word sky\nAnswer: no", "\n") == " yes"
    assert _cut(" \nyes\nno", "\n") == " \nyes"  # a server stop string would have ended this at ""
    assert _cut(" yes", "\n") == " yes"


def test_evaluation_scores_the_answer_cut_at_the_stop(tiny_training_backbone):
    backbone = tiny_training_backbone
    [example] = encode_examples(backbone.tokenizer, EVAL[:1], 256)
    [text] = predict(backbone.model, backbone.tokenizer, [example], 8, backbone.eos_token_ids)
    stop = text.strip()[-1]  # a character the greedy answer reaches after some text
    answer = _cut(text, stop)
    assert answer.strip() != text.strip()
    assert predict(backbone.model, backbone.tokenizer, [example], 8, backbone.eos_token_ids, stop) == [answer]
    scored = dataclasses.replace(example, output_text=answer)
    assert evaluate(backbone.model, backbone.tokenizer, [scored], 8, None, backbone.eos_token_ids,
                    stop=stop)["exact_match"] == 1.0
    assert evaluate(backbone.model, backbone.tokenizer, [scored], 8, None, backbone.eos_token_ids)["exact_match"] == 0


def test_every_baseline_is_scored_on_the_eval_split(tiny_training_backbone):
    backbone = tiny_training_backbone
    data = JobData(TRAIN, EVAL, "Answer yes or no.", ("maybe", "no", "yes"))
    scores = score_baselines(backbone, data, max_new_tokens=4)
    assert scores.skipped == {}
    assert {f"{name}_exact_match" for name in BASELINES} <= set(scores.metrics)
    assert scores.metrics["majority_exact_match"] == pytest.approx(2 / 3)  # "yes" on two of three
    assert scores.best_exact_match == max(scores.metrics[f"{n}_exact_match"] for n in BASELINES)
    # Each in-context baseline is the plain backbone's evaluation of the prompts a user would write.
    demos = pick_demonstrations(TRAIN, 4)
    k_shot = encode_examples(backbone.tokenizer, [with_context(e, data.instruction, demos) for e in EVAL], 256)
    direct = evaluate(backbone.model, backbone.tokenizer, k_shot, 4, data.labels, backbone.eos_token_ids, stop="\n")
    assert scores.metrics["k_shot_exact_match"] == direct["exact_match"]
    assert scores.metrics["k_shot_eval_loss"] == pytest.approx(direct["eval_loss"])


def test_a_baseline_that_does_not_fit_the_context_is_skipped_not_the_job(tiny_training_backbone):
    long_train = [{"input": "many words " * 30 + str(i), "output": o} for i, o in enumerate(["yes", "no"] * 3)]
    scores = score_baselines(tiny_training_backbone, JobData(long_train, EVAL, None, None), max_new_tokens=2)
    assert set(scores.skipped) == {"instruction", "k_shot"}
    assert scores.skipped["instruction"] == "the job has no instruction"
    assert "k_shot baseline[0]: expected prompt + output of at most max_length=256" in scores.skipped["k_shot"]
    assert {"zero_shot_exact_match", "majority_exact_match"} <= set(scores.metrics)
    assert "k_shot_exact_match" not in scores.metrics


def test_baselines_need_an_eval_split(tiny_training_backbone):
    with pytest.raises(TrainingDataError, match="expected an eval split to score baselines on, found none"):
        score_baselines(tiny_training_backbone, JobData(TRAIN, [], None, None), max_new_tokens=2)
