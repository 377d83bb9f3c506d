"""Calendar dates in ISO form (1950-2049) -> the month's name, and the quarter of the year ("Q3").
Made by code with the standard library's calendar, the same on every machine. (Reformatting a date
is left out: SmolLM2 spells digits one token each, so "09/25/2045" is ten tokens to match exactly.)"""

from __future__ import annotations

import calendar
import random
from datetime import date, timedelta

from prefixserve.training.tasks.common import generated_task

_FIRST, _LAST = date(1950, 1, 1), date(2049, 12, 31)


def _random_date(rng: random.Random) -> date:
    return _FIRST + timedelta(days=rng.randint(0, (_LAST - _FIRST).days))


def _month(rng: random.Random) -> tuple[str, str]:
    day = _random_date(rng)
    return day.isoformat(), calendar.month_name[day.month]


def _quarter(rng: random.Random) -> tuple[str, str]:
    day = _random_date(rng)
    return day.isoformat(), f"Q{(day.month - 1) // 3 + 1}"


TASKS = {
    "month_of_date": generated_task("Give the name of the date's month.", "date", _month),
    "quarter_of_date": generated_task("Give the quarter of the year the date falls in, Q1 to Q4.", "date", _quarter),
}
