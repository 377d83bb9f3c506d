"""Numbers: a number written in English words -> its digits, and the sum of two numbers. Made by code;
the backbone knows some of it, so these are not near chance."""

from __future__ import annotations

import random

from prefixserve.training.tasks.common import generated_task

_ONES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
         "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")
MAX_NUMBER = 999  # "nine hundred ninety-nine": the longest input stays a few tokens


def number_words(n: int) -> str:
    """English words for 0 <= n <= 999, hyphenated tens ("four hundred twenty-one"), no "and"."""
    if not 0 <= n <= MAX_NUMBER:
        raise ValueError(f"expected 0..{MAX_NUMBER}, got {n}")
    hundreds, rest = divmod(n, 100)
    words = [f"{_ONES[hundreds]} hundred"] if hundreds else []
    if rest or not hundreds:
        words.append(_ONES[rest] if rest < 20 else _TENS[rest // 10] + (f"-{_ONES[rest % 10]}" if rest % 10 else ""))
    return " ".join(words)


def _from_words(rng: random.Random) -> tuple[str, str]:
    n = rng.randint(0, MAX_NUMBER)
    return number_words(n), str(n)


def _sum(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"{a} + {b}", str(a + b)


TASKS = {
    "number_from_words": generated_task("Write the number in digits.", "arithmetic", _from_words),
    "sum_of_two": generated_task("Give the sum of the two numbers.", "arithmetic", _sum),
}
