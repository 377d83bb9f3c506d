"""File names -> what they hold: the media category faker files each extension under, and the MIME
type Python's own table gives it (`mimetypes`' built-in map, never the machine's /etc/mime.types, so
every machine builds the same task), for the extensions faker knows that the table has. Stems are
common words, so an input is "budget.xlsx"."""

from __future__ import annotations

import math
import mimetypes
import random
from functools import cache

from prefixserve.training.tasks.common import Splits, TaskSpec, balanced_splits, common_words, sampled_splits


@cache
def _categories() -> dict[str, tuple[str, ...]]:
    """category -> its extensions, as faker's file provider groups them (audio, image, office, text, video)."""
    from faker.providers.file import Provider

    return {category: tuple(extensions) for category, extensions in Provider.file_extensions.items()}


@cache
def _mime_table() -> tuple[tuple[str, str], ...]:
    """(extension, MIME type) for faker's extensions in the standard library's built-in table, vendor
    types ("application/vnd.ms-excel", 8+ tokens) left out: 20 of faker's 32 extensions."""
    table = mimetypes.MimeTypes().types_map[True]  # a fresh instance reads no system files: the built-in map
    extensions = [ext for exts in _categories().values() for ext in exts]
    return tuple((ext, table[f".{ext}"]) for ext in extensions if "/vnd." not in table.get(f".{ext}", "/vnd."))


def _category(rng: random.Random, num_train: int, num_eval: int) -> Splits:
    stems = common_words()
    pools = {category: [f"{stem}.{ext}" for ext in extensions for stem in stems]
             for category, extensions in _categories().items()}
    return balanced_splits(rng, pools, num_train, num_eval)


def _mime(rng: random.Random, num_train: int, num_eval: int) -> Splits:
    # Every extension gets stems of its own, so eval asks about extensions training has also shown.
    table, words = _mime_table(), list(common_words())
    stems_per_extension = math.ceil((num_train + num_eval) / len(table)) + 1
    stems = rng.sample(words, min(len(words), stems_per_extension))
    pairs = [(f"{stem}.{ext}", mime) for ext, mime in table for stem in stems]
    return sampled_splits(rng, pairs, num_train, num_eval)


TASKS = {
    "file_category": TaskSpec("Say whether the file is audio, image, office, text or video.", tuple(_categories()),
                              near_chance=False, family="file", make=_category),
    "file_mime_type": TaskSpec("Give the MIME type of the file.", None, near_chance=False, family="file",
                               make=_mime),
}
