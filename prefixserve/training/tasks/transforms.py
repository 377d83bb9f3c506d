"""Copying with an edit: the word in capitals, and two words in the other order. The answer is in the
input; what a task has to learn is the edit."""

from __future__ import annotations

import random

from prefixserve.training.tasks.common import common_words, generated_task


def _uppercase(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(common_words())
    return word, word.upper()


def _swap(rng: random.Random) -> tuple[str, str]:
    a, b = rng.sample(common_words(), 2)
    return f"{a} {b}", f"{b} {a}"


TASKS = {
    "uppercase_word": generated_task("Write the word in capital letters.", "transform", _uppercase),
    "swap_words": generated_task("Write the two words in the other order.", "transform", _swap),
}
