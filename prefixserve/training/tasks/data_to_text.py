"""E2E-style data-to-text: a restaurant's attributes (`name[...] | food[...] | area[...]`) -> one
templated sentence. Names come from a seeded `Faker`; the other slots from small fixed vocabularies,
so the sentence is learnable and exact match is a fair score."""

from __future__ import annotations

import random
from collections.abc import Callable

from faker import Faker

from prefixserve.training.tasks.common import Splits, TaskSpec, generated_splits, seeded_faker

_VENUES = ("Kitchen", "Grill", "Table", "Bistro", "Diner", "Tavern", "Garden", "Oven")
_FOODS = ("Italian", "French", "Chinese", "Indian", "Japanese", "English", "Thai", "Mexican")
_AREAS = ("riverside", "city centre", "harbour", "old town")
_EAT_TYPES = ("pub", "restaurant", "coffee shop")
_PRICES = {"cheap": "cheap", "moderate": "moderately priced", "high": "high-priced"}


def _restaurant_name(fake: Faker) -> str:
    return f"The {fake.last_name()} {fake.random_element(_VENUES)}"


def _area(fake: Faker) -> tuple[str, str]:
    name, food, area = _restaurant_name(fake), fake.random_element(_FOODS), fake.random_element(_AREAS)
    return f"name[{name}] | food[{food}] | area[{area}]", f"{name} serves {food} food in the {area} area."


def _near(fake: Faker) -> tuple[str, str]:
    name, eat_type = _restaurant_name(fake), fake.random_element(_EAT_TYPES)
    price, near = fake.random_element(tuple(_PRICES)), fake.city()
    return (f"name[{name}] | eatType[{eat_type}] | priceRange[{price}] | near[{near}]",
            f"{name} is a {_PRICES[price]} {eat_type} near {near}.")


def _make(template: Callable[[Faker], tuple[str, str]]) -> Callable[[random.Random, int, int], Splits]:
    def make(rng: random.Random, num_train: int, num_eval: int) -> Splits:
        fake = seeded_faker(rng)
        return generated_splits(rng, lambda _: template(fake), num_train, num_eval)

    return make


# Exact match against a fixed wording: the backbone alone almost never writes this very sentence.
TASKS = {
    "restaurant_area": TaskSpec("Write one sentence saying what food the restaurant serves and where.", None,
                                near_chance=True, family="data_to_text", make=_make(_area)),
    "restaurant_near": TaskSpec("Write one sentence describing the venue's type, price and landmark.", None,
                                near_chance=True, family="data_to_text", make=_make(_near)),
}
