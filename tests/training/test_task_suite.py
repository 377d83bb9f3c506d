"""The built-in task suite: enough tasks, fixed and disjoint splits, balanced labels, answers that are
right by an independent check, and outputs short enough for greedy exact match on SmolLM2."""

import hashlib
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter

import pytest

from prefixserve.errors import TrainingDataError
from prefixserve.training.tasks import FAMILIES, TASK_NAMES, TaskData, build_task

MAX_OUTPUT_TOKENS = 6  # every task but data-to-text
MAX_INPUT_TOKENS = 16


def _digest(tasks: list[TaskData]) -> str:
    return hashlib.sha256(json.dumps([[t.name, t.train, t.eval] for t in tasks]).encode()).hexdigest()


@pytest.fixture(scope="module")
def tasks() -> dict[str, TaskData]:
    return {name: build_task(name) for name in TASK_NAMES}


def test_suite_has_enough_tasks_in_every_family():
    families = Counter(build_task(name, num_train=4, num_eval=2).family for name in TASK_NAMES)
    assert len(TASK_NAMES) == len(set(TASK_NAMES)) >= 36
    assert families["mapping"] >= 8 and families["rule"] >= 5 and families["sentiment"] >= 2
    assert families["lookup"] >= 4 and families["data_to_text"] >= 2
    assert families["file"] == families["arithmetic"] == families["date"] == families["transform"] == 2
    assert families["entity"] == 1
    assert set(families) == set(FAMILIES) == {"mapping", "rule", "sentiment", "lookup", "data_to_text", "file",
                                              "arithmetic", "date", "entity", "transform"}
    # The suite's first 27 tasks keep their order and names (IPT's held-out split and caches name them).
    assert TASK_NAMES[:5] == ("made_up_color", "made_up_animal", "made_up_yes_no", "made_up_number", "made_up_fruit")
    assert TASK_NAMES[25:27] == ("restaurant_area", "restaurant_near")


@pytest.mark.parametrize("name", TASK_NAMES)
def test_task_builds_fast_with_fixed_disjoint_splits(name):
    start = time.perf_counter()
    task = build_task(name, seed=3)
    assert time.perf_counter() - start < 2.0  # generous: the machine is shared
    assert task.name == name and task.instruction.endswith(".")
    assert len(task.eval) == 64
    # Train is capped only where the material runs out (the pycountry tables), never below 48.
    assert (48 <= len(task.train) <= 256) if task.family == "lookup" else len(task.train) == 256
    for example in task.train + task.eval:
        assert set(example) == {"input", "output"}
        assert example["input"].strip() and example["output"].strip()
    train_inputs = [e["input"] for e in task.train]
    eval_inputs = [e["input"] for e in task.eval]
    assert len(set(train_inputs)) == len(train_inputs) and len(set(eval_inputs)) == len(eval_inputs)
    assert not set(train_inputs) & set(eval_inputs)
    assert task.near_chance == (task.family in ("mapping", "rule", "data_to_text"))


@pytest.mark.parametrize("name", TASK_NAMES)
def test_classification_labels_are_balanced(name, tasks):
    task = tasks[name]
    if task.labels is None:
        assert task.family in ("lookup", "data_to_text", "arithmetic", "date", "transform") \
            or name in ("alphabetical_first", "longer_word", "file_mime_type")
        return
    assert len(set(task.labels)) == len(task.labels) >= 2
    for split in (task.train, task.eval):
        counts = Counter(e["output"] for e in split)
        assert set(counts) <= set(task.labels)
        per_label = [counts[label] for label in task.labels]
        assert max(per_label) - min(per_label) <= 1, counts


def test_same_seed_same_examples_in_another_process(tasks):
    # Another interpreter with another string-hash seed: nothing may depend on set order or global RNG.
    code = ("from prefixserve.training.tasks import TASK_NAMES, build_task; import test_task_suite as t; "
            "print(t._digest([build_task(n) for n in TASK_NAMES]))")
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": os.path.dirname(__file__)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest([tasks[name] for name in TASK_NAMES])


@pytest.mark.parametrize("name", TASK_NAMES)
def test_another_seed_gives_other_examples(name, tasks):
    other = build_task(name, seed=1)
    assert other.train != tasks[name].train and other.eval != tasks[name].eval
    if tasks[name].family == "mapping":  # the seed picks the keywords and their labels
        assert keyword_labels(tasks[name]) != keyword_labels(other)


def keyword_labels(task) -> dict[str, str]:
    """keyword -> label of a mapping task: the word its inputs share, by label."""
    words = {}
    for e in task.train + task.eval:
        for w in e["input"].split():
            words.setdefault(w, set()).add(e["output"])
    counts = {w: sum(w in e["input"].split() for e in task.train + task.eval) for w in words}
    return {w: next(iter(labs)) for w, labs in words.items() if len(labs) == 1 and counts[w] > 4}


def test_mapping_eval_keywords_were_all_seen_in_training_with_the_same_label(tasks):
    """Otherwise the mapping could not be learned: eval would measure chance."""
    for task in tasks.values():
        if task.family != "mapping":
            continue
        mapping = keyword_labels(task)
        assert len(mapping) == 4 * len(task.labels), (task.name, len(mapping))
        for e in task.eval:
            (keyword,) = [w for w in e["input"].split() if w in mapping]
            assert mapping[keyword] == e["output"]
            assert any(keyword in t["input"].split() for t in task.train)


def test_outputs_and_inputs_are_short_for_smollm2(tasks, smollm2_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    for task in tasks.values():
        for example in task.train + task.eval:
            num_out = len(tokenizer.encode(example["output"], add_special_tokens=False))
            num_in = len(tokenizer.encode(example["input"], add_special_tokens=False))
            if task.family == "data_to_text":
                assert len(example["output"].split()) <= 20 and num_out <= 32, (task.name, example)
            else:
                assert num_out <= MAX_OUTPUT_TOKENS and num_in <= MAX_INPUT_TOKENS, (task.name, example)


def test_rule_answers_follow_the_rule(tasks):
    rules = {
        "starts_with_vowel": lambda x: "yes" if x[0] in "aeiou" else "no",
        "length_parity": lambda x: "even" if len(x) % 2 == 0 else "odd",
        "first_letter": lambda x: x[0],
        "letter_count": lambda x: str(len(x)),
        "alphabetical_first": lambda x: sorted(x.split())[0],
        "longer_word": lambda x: max(x.split(), key=len),
    }
    assert set(rules) <= set(TASK_NAMES)
    for name, rule in rules.items():
        for example in tasks[name].train + tasks[name].eval:
            assert example["output"] == rule(example["input"]), (name, example)
    # The answer of a two-word rule is not always the first word (copying it would score 100%).
    for name in ("alphabetical_first", "longer_word"):
        firsts = sum(e["output"] == e["input"].split()[0] for e in tasks[name].eval)
        assert 16 <= firsts <= 48, (name, firsts)


def test_sentiment_labels_agree_with_vader(tasks):
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    analyzer = SentimentIntensityAnalyzer()
    sign = {"positive": 1, "neutral": 0, "negative": -1}
    for name in ("sentiment_polarity", "sentiment_three_way", "sentiment_negation"):
        for example in tasks[name].train + tasks[name].eval:
            compound = analyzer.polarity_scores(example["input"])["compound"]
            assert (compound > 0) - (compound < 0) == sign[example["output"]], (name, example, compound)
    negated = sum(e["input"].startswith("not ") for e in tasks["sentiment_negation"].train)
    assert 64 <= negated <= 192


def test_new_family_answers_are_right_by_an_independent_check(tasks):
    import mimetypes
    from datetime import datetime

    from faker.providers.color import Provider as Colors
    from faker.providers.file import Provider as Files
    from faker.providers.job import Provider as Jobs
    from word2number import w2n

    category_of = {ext: category for category, exts in Files.file_extensions.items() for ext in exts}
    checks = {
        "file_category": lambda x: category_of[x.rsplit(".", 1)[1]],
        "file_mime_type": lambda x: mimetypes.MimeTypes().guess_type(x)[0],
        "number_from_words": lambda x: str(w2n.word_to_num(x)),
        "sum_of_two": lambda x: str(sum(int(n) for n in x.split(" + "))),
        "month_of_date": lambda x: datetime.strptime(x, "%Y-%m-%d").strftime("%B"),
        "quarter_of_date": lambda x: f"Q{-(-datetime.strptime(x, '%Y-%m-%d').month // 3)}",
        "uppercase_word": str.upper,
        "swap_words": lambda x: " ".join(reversed(x.split(" "))),
    }
    for name, check in checks.items():
        for example in tasks[name].train + tasks[name].eval:
            assert example["output"] == check(example["input"]), (name, example)
    assert len({e["output"] for e in tasks["file_mime_type"].eval}) >= 12  # not one type repeated
    words = [e["input"] for e in tasks["number_from_words"].train]
    assert any("hundred" not in w for w in words) and any("-" in w for w in words)
    for example in tasks["entity_type"].train + tasks["entity_type"].eval:
        x, kind = example["input"], example["output"]
        assert (x in Colors.all_colors) == (kind == "color") and (x in Jobs.jobs) == (kind == "job"), example


def test_lookups_hold_known_facts():
    facts = {
        "country_alpha2": {"Germany": "DE", "Japan": "JP", "South Korea": "KR"},
        "country_alpha3": {"Germany": "DEU", "Brazil": "BRA", "Vietnam": "VNM"},
        "country_currency": {"Japan": "JPY", "India": "INR", "Switzerland": "CHF"},
        "currency_code": {"Euro": "EUR", "Yen": "JPY", "Pound Sterling": "GBP"},
        "language_code": {"French": "fr", "German": "de", "Swahili": "sw"},
        "subdivision_country": {"Bayern": "DE", "California": "US"},
    }
    for name, expected in facts.items():
        task = build_task(name, num_train=100_000)
        table = {e["input"]: e["output"] for e in task.train + task.eval}
        assert {k: table.get(k) for k in expected} == expected, name
        assert not any(re.search(r"[,(]", x) for x in table), name  # short names only
    currencies = {e["input"] for e in build_task("currency_code", num_train=100_000).train}
    assert not currencies & {"Gold", "Silver", "SDR (Special Drawing Right)"}


def test_data_to_text_sentence_carries_every_slot(tasks):
    for name in ("restaurant_area", "restaurant_near"):
        for example in tasks[name].eval:
            slots = dict(re.findall(r"(\w+)\[([^\]]*)\]", example["input"]))
            assert example["output"].startswith(slots["name"] + " ") and example["output"].endswith(".")
            for key, value in slots.items():
                if key != "priceRange":  # rendered as a phrase ("moderately priced")
                    assert value in example["output"], (name, key, example)


def test_small_and_capped_sizes():
    small = build_task("made_up_animal", num_train=10, num_eval=6)
    assert len(small.train) == 10 and len(small.eval) == 6
    assert sorted(Counter(e["output"] for e in small.eval).values()) == [1, 1, 2, 2]
    # A table smaller than asked for: eval stays full, train keeps all that is left.
    big = build_task("country_alpha3", num_train=100_000)
    assert len(big.eval) == 64 and len(big.train) == len(build_task("country_alpha3", num_train=256).train)
    # Balanced tasks shrink train for every label alike when one label runs out.
    three = build_task("sentiment_three_way", num_train=100_000, num_eval=30)
    counts = Counter(e["output"] for e in three.train)
    assert len(set(counts.values())) == 1 and counts["neutral"] > 500


def test_errors_say_what_exists_and_what_is_missing():
    with pytest.raises(TrainingDataError, match=r"unknown task 'sentimnet'.*sentiment_polarity"):
        build_task("sentimnet")
    with pytest.raises(TrainingDataError, match=r"task 'country_currency'.* has 11\d distinct inputs.*500 eval"):
        build_task("country_currency", num_eval=500)
    with pytest.raises(TrainingDataError, match=r"task 'sentiment_three_way'.*label 'neutral' has only \d+"):
        build_task("sentiment_three_way", num_eval=3000)
    with pytest.raises(TrainingDataError, match="num_train >= 1"):
        build_task("word_size", num_train=0)
