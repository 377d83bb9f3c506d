"""Fixed rules over words (first letter, length, alphabetical order): deterministic short answers that
a 135M backbone gets about as often as guessing, because it sees tokens, not letters."""

from __future__ import annotations

import random
import string
from collections.abc import Callable
from functools import partial

from prefixserve.training.tasks.common import (
    Splits,
    TaskSpec,
    balanced_splits,
    common_words,
    generated_splits,
    made_up_words,
)

_NUM_MADE_UP = 3000  # with the ~950 common words, enough for every first letter and length to fill its quota


def _classify(rule: Callable[[str], str], labels: tuple[str, ...], rng: random.Random,
              num_train: int, num_eval: int) -> Splits:
    words = list(common_words()) + made_up_words(rng, _NUM_MADE_UP)
    pools: dict[str, list[str]] = {lab: [] for lab in labels}
    for word in words:
        label = rule(word)
        if label in pools:  # e.g. letter counts outside 3..8 are left out
            pools[label].append(word)
    return balanced_splits(rng, pools, num_train, num_eval)


def _pair(keep: Callable[[str, str], bool], answer: Callable[[str, str], str], rng: random.Random,
          num_train: int, num_eval: int) -> Splits:
    words = common_words()

    def generate(rng: random.Random) -> tuple[str, str]:
        while True:
            a, b = rng.sample(words, 2)
            if keep(a, b):
                return f"{a} {b}", answer(a, b)

    return generated_splits(rng, generate, num_train, num_eval)


def _rule(instruction: str, labels: tuple[str, ...], rule: Callable[[str], str]) -> TaskSpec:
    return TaskSpec(instruction, labels, near_chance=True, family="rule", make=partial(_classify, rule, labels))


def _pair_rule(instruction: str, keep: Callable[[str, str], bool], answer: Callable[[str, str], str]) -> TaskSpec:
    return TaskSpec(instruction, None, near_chance=True, family="rule", make=partial(_pair, keep, answer))


TASKS = {
    "starts_with_vowel": _rule("Answer yes if the word starts with a vowel, else no.", ("yes", "no"),
                               lambda w: "yes" if w[0] in "aeiou" else "no"),
    "length_parity": _rule("Say whether the word has an even or odd number of letters.", ("even", "odd"),
                           lambda w: "odd" if len(w) % 2 else "even"),
    "first_letter": _rule("Give the first letter of the word.", tuple(string.ascii_lowercase), lambda w: w[0]),
    "letter_count": _rule("Give the number of letters in the word.", tuple(str(n) for n in range(3, 9)),
                          lambda w: str(len(w))),
    # Pairs whose first letters differ, so the rule is learnable from one letter, not a tie-break.
    "alphabetical_first": _pair_rule("Give the word of the two that comes first alphabetically.",
                                     keep=lambda a, b: a[0] != b[0], answer=min),
    "longer_word": _pair_rule("Give the longer of the two words.",
                              keep=lambda a, b: abs(len(a) - len(b)) >= 2, answer=lambda a, b: max(a, b, key=len)),
}
