"""Sentiment of single words and negated words, labelled by the mean human valence in the VADER
lexicon that ships inside the `vaderSentiment` wheel."""

from __future__ import annotations

import random

from prefixserve.training.tasks.common import Splits, TaskSpec, balanced_splits, common_words, vader_lexicon

_MARGIN = 1.5  # |mean valence| at least this: clearly polar words only, no borderline ratings
_MAX_LETTERS = 10  # leaves out rare derived forms like "excitabilities"


def _polar() -> tuple[list[str], list[str]]:
    """(positive, negative) words of 3-10 letters, each past the margin."""
    lexicon = [(w, v) for w, v in vader_lexicon() if 3 <= len(w) <= _MAX_LETTERS]
    return [w for w, v in lexicon if v >= _MARGIN], [w for w, v in lexicon if v <= -_MARGIN]


def _polarity(rng: random.Random, num_train: int, num_eval: int) -> Splits:
    positive, negative = _polar()
    return balanced_splits(rng, {"positive": positive, "negative": negative}, num_train, num_eval)


def _three_way(rng: random.Random, num_train: int, num_eval: int) -> Splits:
    # Neutral: common words VADER does not list at all (it lists every word it gives any valence).
    in_lexicon = {w for w, _ in vader_lexicon()}
    neutral = [w for w in common_words() if w not in in_lexicon]
    positive, negative = _polar()
    return balanced_splits(rng, {"positive": positive, "neutral": neutral, "negative": negative},
                           num_train, num_eval)


def _negation(rng: random.Random, num_train: int, num_eval: int) -> Splits:
    # Half the inputs are "not <word>", whose polarity flips (VADER itself scales negated words by -0.74).
    positive, negative = _polar()
    return balanced_splits(rng, {"positive": positive + [f"not {w}" for w in negative],
                                 "negative": negative + [f"not {w}" for w in positive]}, num_train, num_eval)


def _task(instruction: str, labels: tuple[str, ...], make) -> TaskSpec:
    return TaskSpec(instruction, labels, near_chance=False, family="sentiment", make=make)


TASKS = {
    "sentiment_polarity": _task("Say whether the word is positive or negative.", ("positive", "negative"),
                                _polarity),
    "sentiment_three_way": _task("Say whether the word is positive, neutral or negative.",
                                 ("positive", "neutral", "negative"), _three_way),
    "sentiment_negation": _task("Say whether the word or negated word is positive or negative.",
                                ("positive", "negative"), _negation),
}
