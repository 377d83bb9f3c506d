"""Lookups over the ISO tables in `pycountry` (3166 countries and subdivisions, 4217 currencies, 639
languages). Knowledge the backbone may partly have. The tables are small: train is capped at what
is left after the eval split (e.g. 118 country/currency pairs give 54 train examples beside 64 eval)."""

from __future__ import annotations

import random
import re
from collections import Counter
from collections.abc import Callable
from functools import cache, partial

from prefixserve.training.tasks.common import Splits, TaskSpec, sampled_splits

# ISO 4217 entries that are not a circulating money (funds, units of account, metals, test codes).
_NOT_MONEY_NAMES = {"Gold", "Silver", "Platinum", "Palladium", "Sucre"}
_NOT_MONEY_WORDS = ("Unit", "Unidad", "WIR", "Mvdol", "Accounting", "codes", "(")
_MAX_SUBDIVISION_CHARS = 24  # keeps inputs to a few tokens


def _country_name(country) -> str | None:
    """The short name ("South Korea", not "Korea, Republic of"); None for names that stay awkward."""
    name = getattr(country, "common_name", country.name)
    return None if "," in name or "(" in name else name


@cache
def _countries() -> tuple[tuple[str, str, str, str], ...]:
    """(name, alpha_2, alpha_3, numeric) of every country with a short name, in table order."""
    import pycountry

    rows = ((_country_name(c), c.alpha_2, c.alpha_3, c.numeric) for c in pycountry.countries)
    return tuple(row for row in rows if row[0] is not None)


@cache
def _country_alpha2() -> tuple[tuple[str, str], ...]:
    return tuple((name, a2) for name, a2, _, _ in _countries())


@cache
def _country_alpha3() -> tuple[tuple[str, str], ...]:
    return tuple((name, a3) for name, _, a3, _ in _countries())


@cache
def _country_currency() -> tuple[tuple[str, str], ...]:
    import pycountry

    # ISO 4217 gives a national currency its country's numeric code and a code that starts with the
    # country's alpha-2 (JPY: 392, JP); shared currencies (EUR, XOF) match neither, so they are left out.
    by_numeric = {cur.numeric: cur.alpha_3 for cur in pycountry.currencies}
    return tuple((name, by_numeric[num]) for name, a2, _, num in _countries() if by_numeric.get(num, "")[:2] == a2)


@cache
def _currency_code() -> tuple[tuple[str, str], ...]:
    import pycountry

    return _unique_inputs([(cur.name, cur.alpha_3) for cur in pycountry.currencies
                           if cur.name not in _NOT_MONEY_NAMES and not any(w in cur.name for w in _NOT_MONEY_WORDS)])


@cache
def _language_code() -> tuple[tuple[str, str], ...]:
    import pycountry

    # "Swahili (macrolanguage)" -> "Swahili"
    return _unique_inputs([(re.sub(r"\s*\(.*\)$", "", lang.name), lang.alpha_2)
                           for lang in pycountry.languages if hasattr(lang, "alpha_2")])


@cache
def _subdivision_country() -> tuple[tuple[str, str], ...]:
    import pycountry

    # Inverted names ("Madrid, Comunidad de") and annotated ones ("Boujdour (EH)") are left out.
    return _unique_inputs([(sub.name, sub.country_code) for sub in pycountry.subdivisions
                           if len(sub.name) <= _MAX_SUBDIVISION_CHARS and not any(c in sub.name for c in ",(")])


def _unique_inputs(rows: list[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Drop every row whose input occurs more than once: its answer would be ambiguous."""
    counts = Counter(x for x, _ in rows)
    return tuple((x, y) for x, y in rows if counts[x] == 1)


def _lookup(table: Callable[[], tuple[tuple[str, str], ...]], rng: random.Random,
            num_train: int, num_eval: int) -> Splits:
    return sampled_splits(rng, list(table()), num_train, num_eval)


def _task(table: Callable[[], tuple[tuple[str, str], ...]], instruction: str) -> TaskSpec:
    return TaskSpec(instruction, None, near_chance=False, family="lookup", make=partial(_lookup, table))


TASKS = {
    "country_alpha2": _task(_country_alpha2, "Give the two-letter ISO code of the country."),
    "country_alpha3": _task(_country_alpha3, "Give the three-letter ISO code of the country."),
    "country_currency": _task(_country_currency, "Give the ISO code of the country's own currency."),
    "currency_code": _task(_currency_code, "Give the three-letter ISO code of the currency."),
    "language_code": _task(_language_code, "Give the two-letter ISO 639-1 code of the language."),
    "subdivision_country": _task(_subdivision_country, "Give the two-letter ISO code of the region's country."),
}
