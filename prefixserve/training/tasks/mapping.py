"""Arbitrary keyword -> label mappings: each input word gets a label by the task's seed alone, so the
backbone cannot know the answer and an adapter has to memorise it (and the label set)."""

from __future__ import annotations

import random
from functools import partial

from prefixserve.training.tasks.common import Splits, TaskSpec, common_words, labelled_splits, made_up_words


def _made_up(labels: tuple[str, ...], rng: random.Random, num_train: int, num_eval: int) -> Splits:
    return labelled_splits(rng, made_up_words(rng, num_train + num_eval), labels, num_train, num_eval)


def _common(labels: tuple[str, ...], rng: random.Random, num_train: int, num_eval: int) -> Splits:
    return labelled_splits(rng, list(common_words()), labels, num_train, num_eval)


# name: (instruction, labels, pool). Made-up words have no limit; common words cap train at ~890.
_MAPPINGS = {
    "made_up_color": ("Map the made-up word to its color.", ("red", "green", "blue"), _made_up),
    "made_up_animal": ("Map the made-up word to its animal.", ("cat", "dog", "fish", "bird"), _made_up),
    "made_up_yes_no": ("Answer yes or no for the made-up word.", ("yes", "no"), _made_up),
    "made_up_number": ("Map the made-up word to its number.", ("one", "two", "three", "four"), _made_up),
    "made_up_fruit": ("Map the made-up word to its fruit.", ("apple", "lemon", "mango"), _made_up),
    "word_direction": ("Map the word to its compass direction.", ("north", "south", "east", "west"), _common),
    "word_size": ("Map the word to its size.", ("small", "large"), _common),
    "word_temperature": ("Map the word to hot or cold.", ("hot", "cold"), _common),
    "word_season": ("Map the word to its season.", ("spring", "summer", "autumn", "winter"), _common),
    "word_position": ("Map the word to its position.", ("up", "down", "left", "right"), _common),
}

TASKS = {name: TaskSpec(instruction, labels, near_chance=True, family="mapping", make=partial(pool, labels))
         for name, (instruction, labels, pool) in _MAPPINGS.items()}
