"""What every task family shares: the spec a family registers, word pools, and the two ways a task's
material becomes fixed train/eval splits (balanced classes, or a capped sample of open outputs).

Determinism: every random choice goes through the `random.Random` a task is given, and every pool is
a list in a fixed order (never a set: string hashing changes between processes)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources

from prefixserve.errors import TrainingDataError

Example = dict[str, str]  # {"input": ..., "output": ...}
Splits = tuple[list[Example], list[Example]]  # (train, eval)


@dataclass(frozen=True)
class TaskSpec:
    """One registered task: how to describe it, and `make(rng, num_train, num_eval) -> (train, eval)`."""

    instruction: str
    labels: tuple[str, ...] | None
    near_chance: bool
    family: str
    make: Callable[[random.Random, int, int], Splits]


# Made-up words: the first syllable may start with any consonant (so every first letter occurs) or a
# vowel; later syllables use friendlier onsets so the words stay pronounceable and tokenize short.
_VOWELS = "aeiou"
_FIRST_ONSETS = tuple("bcdfghjklmnpqrstvwxyz") + ("", "", "", "bl", "br", "gl", "gr", "pl", "st", "tr")
_ONSETS = tuple("bdfgklmnprstvz")
_CODAS = ("", "", "", "n", "r", "l", "m", "k", "s")


def made_up_word(rng: random.Random) -> str:
    syllables = [rng.choice(_FIRST_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)]
    for _ in range(rng.choice((1, 1, 2))):
        syllables.append(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS))
    return "".join(syllables)


def made_up_words(rng: random.Random, num_words: int) -> list[str]:
    """`num_words` distinct made-up words that are neither common English words nor in the VADER lexicon."""
    common = frozenset(common_words()) | {word for word, _ in vader_lexicon()}
    words: dict[str, None] = {}
    while len(words) < num_words:
        word = made_up_word(rng)
        if word not in common:
            words[word] = None
    return list(words)


def seeded_faker(rng: random.Random):
    """An en_US `Faker` seeded from `rng`, so a task's fake names follow the task's seed."""
    from faker import Faker

    fake = Faker("en_US")
    fake.seed_instance(rng.randrange(2**32))
    return fake


@cache
def common_words() -> tuple[str, ...]:
    """About 950 common English words (faker's en_US lorem list), 3+ letters, in the list's order."""
    from faker.providers.lorem.en_US import Provider

    return tuple(w for w in Provider.word_list if len(w) >= 3 and w.isalpha())


@cache
def vader_lexicon() -> tuple[tuple[str, float], ...]:
    """(word, mean valence in -4..4) for the plain lowercase words (no emoticons) in the lexicon shipped
    in the `vaderSentiment` wheel (each line: token, mean, std, ten human ratings)."""
    text = (resources.files("vaderSentiment") / "vader_lexicon.txt").read_text(encoding="utf-8")
    rows = (line.split("\t") for line in text.splitlines() if line.strip())
    return tuple((row[0], float(row[1])) for row in rows
                 if row[0].isascii() and row[0].isalpha() and row[0].islower())


def balanced_counts(total: int, num_labels: int) -> list[int]:
    """`total` split over `num_labels` so that counts differ by at most one."""
    return [total // num_labels + (i < total % num_labels) for i in range(num_labels)]


def labelled_splits(rng: random.Random, inputs: list[str], labels: tuple[str, ...],
                    num_train: int, num_eval: int) -> Splits:
    """Give distinct `inputs` arbitrary but balanced labels: eval is filled first, train is capped at the rest."""
    inputs = list(inputs)
    rng.shuffle(inputs)
    eval_inputs, train_inputs = _split_off(inputs, num_train, num_eval, f"{len(inputs)} distinct inputs")

    def label(split_inputs: list[str]) -> list[Example]:
        outputs = [lab for lab, n in zip(labels, balanced_counts(len(split_inputs), len(labels))) for _ in range(n)]
        rng.shuffle(outputs)
        return [{"input": x, "output": y} for x, y in zip(split_inputs, outputs)]

    return label(train_inputs), label(eval_inputs)


def balanced_splits(rng: random.Random, pools: dict[str, list[str]], num_train: int, num_eval: int) -> Splits:
    """Draw inputs from each label's pool so both splits are balanced over the labels.

    Pools must not share inputs. Eval is filled first; if a pool runs short, train shrinks (for every
    label alike, to stay balanced)."""
    labels = list(pools)
    shuffled = {lab: rng.sample(pools[lab], len(pools[lab])) for lab in labels}
    eval_counts = balanced_counts(num_eval, len(labels))
    left = {lab: len(shuffled[lab]) - n for lab, n in zip(labels, eval_counts)}
    smallest = min(labels, key=lambda lab: left[lab])
    if left[smallest] < 1:
        raise TrainingDataError(f"label {smallest!r} has only {len(pools[smallest])} distinct inputs, "
                                f"not enough for {num_eval} eval examples plus a train split")
    train_counts = balanced_counts(min(num_train, left[smallest] * len(labels)), len(labels))
    train: list[Example] = []
    eval_: list[Example] = []
    for lab, n_eval, n_train in zip(labels, eval_counts, train_counts):
        eval_ += [{"input": x, "output": lab} for x in shuffled[lab][:n_eval]]
        train += [{"input": x, "output": lab} for x in shuffled[lab][n_eval:n_eval + n_train]]
    rng.shuffle(train)
    rng.shuffle(eval_)
    return train, eval_


def sampled_splits(rng: random.Random, pairs: list[tuple[str, str]], num_train: int, num_eval: int) -> Splits:
    """Sample (input, output) pairs with distinct inputs: eval is filled first, train is capped at the rest."""
    pairs = rng.sample(pairs, len(pairs))
    eval_pairs, train_pairs = _split_off(pairs, num_train, num_eval, f"{len(pairs)} distinct inputs")
    return ([{"input": x, "output": y} for x, y in train_pairs], [{"input": x, "output": y} for x, y in eval_pairs])


def generated_splits(rng: random.Random, generate: Callable[[random.Random], tuple[str, str]],
                     num_train: int, num_eval: int) -> Splits:
    """Splits from a generator of (input, output) pairs over a large space; inputs are made distinct."""
    pairs: dict[str, str] = {}
    max_draws = 20 * (num_train + num_eval)
    for _ in range(max_draws):
        if len(pairs) == num_train + num_eval:
            break
        x, y = generate(rng)
        pairs.setdefault(x, y)
    return sampled_splits(rng, list(pairs.items()), num_train, num_eval)


def generated_task(instruction: str, family: str, generate: Callable[[random.Random], tuple[str, str]]) -> TaskSpec:
    """An open-output task the backbone partly knows, whose examples come from `generate(rng) -> (input, output)`."""
    return TaskSpec(instruction, None, near_chance=False, family=family,
                    make=lambda rng, num_train, num_eval: generated_splits(rng, generate, num_train, num_eval))


def _split_off(items: list, num_train: int, num_eval: int, have: str) -> tuple[list, list]:
    """(eval, train): the first `num_eval` items, then up to `num_train` of the rest."""
    if len(items) <= num_eval:
        raise TrainingDataError(f"the task's material has {have}, not enough for {num_eval} eval examples "
                                f"plus a train split")
    return items[:num_eval], items[num_eval:num_eval + num_train]
