"""What kind of thing a name is: people, cities, companies, jobs and colors drawn from a seeded `Faker`
(en_US). A string more than one kind could be (a color that is also a surname) is left out."""

from __future__ import annotations

import random
from collections import Counter

from prefixserve.training.tasks.common import Splits, TaskSpec, balanced_splits, seeded_faker

_KINDS = {"person": "name", "city": "city", "company": "company", "job": "job", "color": "color_name"}
_DRAWS_PER_KIND = 4  # draws per example wanted: faker repeats itself (there are only 140 color names)


def _entity_type(rng: random.Random, num_train: int, num_eval: int) -> Splits:
    fake = seeded_faker(rng)
    wanted = _DRAWS_PER_KIND * -(-(num_train + num_eval) // len(_KINDS))
    drawn = {kind: list(dict.fromkeys(getattr(fake, method)() for _ in range(wanted)))
             for kind, method in _KINDS.items()}
    kinds_of = Counter(name for names in drawn.values() for name in names)
    pools = {kind: [name for name in names if kinds_of[name] == 1] for kind, names in drawn.items()}
    return balanced_splits(rng, pools, num_train, num_eval)


TASKS = {
    "entity_type": TaskSpec("Say whether the name is a person, city, company, job or color.", tuple(_KINDS),
                            near_chance=False, family="entity", make=_entity_type),
}
