"""How a transformers forward takes its KV cache: by `cache` (transformers 5.24 on) or by
`past_key_values` (before; a deprecated alias until 5.40). Found from the signature, not from a
version number, so a model class that has not moved yet still gets the name it takes."""

from __future__ import annotations

import inspect
from importlib import metadata


def cache_kwarg(model) -> str:
    """The name of `model.forward`'s cache argument; a RuntimeError naming the transformers version
    when it takes neither (an upgrade changed the API again)."""
    parameters = inspect.signature(type(model).forward).parameters  # the class's: hooks wrap instances
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise RuntimeError(f"expected {type(model).__name__}.forward to take a `cache` or `past_key_values` argument, "
                       f"found neither (transformers {metadata.version('transformers')})")
