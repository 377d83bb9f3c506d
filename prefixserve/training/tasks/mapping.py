"""Arbitrary keyword -> label mappings: each task draws a few keywords (made-up or common words) and
gives each a label by its seed alone, so the backbone cannot know the answer and an adapter has to
memorise the mapping. Inputs put a keyword beside a context word ("table glorp", "glorp window"):
train and eval inputs differ, but share the keywords, so eval measures whether the mapping was
learned (with eval keywords unseen in training no adapter could beat chance)."""

from __future__ import annotations

import random
from collections.abc import Callable
from functools import partial

from prefixserve.training.tasks.common import Splits, TaskSpec, balanced_splits, common_words, made_up_words

KEYWORDS_PER_LABEL = 4


def _made_up_keywords(rng: random.Random, num: int) -> list[str]:
    return made_up_words(rng, num)


def _common_keywords(rng: random.Random, num: int) -> list[str]:
    return rng.sample(list(common_words()), num)


def _keyword_splits(keywords_of: Callable[[random.Random, int], list[str]], labels: tuple[str, ...],
                    rng: random.Random, num_train: int, num_eval: int) -> Splits:
    keywords = keywords_of(rng, KEYWORDS_PER_LABEL * len(labels))
    assigned = [lab for lab in labels for _ in range(KEYWORDS_PER_LABEL)]
    rng.shuffle(assigned)
    taken = set(keywords)
    contexts = [w for w in common_words() if w not in taken]  # every input holds exactly one keyword
    pools: dict[str, list[str]] = {lab: [] for lab in labels}
    for keyword, lab in zip(keywords, assigned):
        pools[lab] += [f"{c} {keyword}" for c in contexts] + [f"{keyword} {c}" for c in contexts]
    return balanced_splits(rng, pools, num_train, num_eval)


# name: (instruction, labels, keyword pool)
_MAPPINGS = {
    "made_up_color": ("Map the made-up word to its color.", ("red", "green", "blue"), _made_up_keywords),
    "made_up_animal": ("Map the made-up word to its animal.", ("cat", "dog", "fish", "bird"), _made_up_keywords),
    "made_up_yes_no": ("Answer yes or no for the made-up word.", ("yes", "no"), _made_up_keywords),
    "made_up_number": ("Map the made-up word to its number.", ("one", "two", "three", "four"), _made_up_keywords),
    "made_up_fruit": ("Map the made-up word to its fruit.", ("apple", "lemon", "mango"), _made_up_keywords),
    "word_direction": ("Map the keyword to its compass direction.", ("north", "south", "east", "west"),
                       _common_keywords),
    "word_size": ("Map the keyword to its size.", ("small", "large"), _common_keywords),
    "word_temperature": ("Map the keyword to hot or cold.", ("hot", "cold"), _common_keywords),
    "word_season": ("Map the keyword to its season.", ("spring", "summer", "autumn", "winter"), _common_keywords),
    "word_position": ("Map the keyword to its position.", ("up", "down", "left", "right"), _common_keywords),
}

TASKS = {name: TaskSpec(instruction, labels, near_chance=True, family="mapping",
                        make=partial(_keyword_splits, keywords, labels))
         for name, (instruction, labels, keywords) in _MAPPINGS.items()}
