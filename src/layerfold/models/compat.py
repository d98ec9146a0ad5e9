"""Differences between the transformers versions layerfold supports, in one place.

transformers 5.24 renamed the KV-cache argument and output of every model from
``past_key_values`` to ``cache`` (the old name still works, with a warning, until 5.40);
older releases know only ``past_key_values``.
"""

from __future__ import annotations

import inspect
from functools import lru_cache


@lru_cache(maxsize=None)
def _cache_argument(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwargs(model, cache) -> dict:
    """``{name: cache}`` under the name this model's ``forward`` takes."""
    return {_cache_argument(type(model)): cache}


def returned_cache(output):
    """The KV cache a forward returned, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
