"""Unfold: write a shared-weight model as a standard one, every shared tensor materialised,
for tools that cannot express sharing."""

from __future__ import annotations

from ..nn.shared import fold_deltas, shared_parameter_map, unshare


def unfold(loaded) -> int:
    """Materialise every shared tensor in place (a standard model); returns how many."""
    model = loaded.model
    exclude = set(getattr(model, "all_tied_weights_keys", {}) or {})
    mapping = shared_parameter_map(model, exclude=exclude)
    unshare(model, mapping)
    fold_deltas(model)  # each member's W + B A becomes its own plain weight
    for key in ("layerfold_shared", "layerfold_groups", "layerfold_base_model_type", "auto_map", "layerfold_deltas"):
        if hasattr(model.config, key):
            delattr(model.config, key)
    return len(mapping)
