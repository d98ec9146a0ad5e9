"""Which layers to remove, by each pruning criterion (METHODS.md section 1).

Each function takes the scores of one calibration pass and the number of layers to remove
and returns the sorted indices to remove. None of them looks at the architecture.
"""

from __future__ import annotations

import math

from ..errors import LayerfoldError
from ..importance.criteria import LayerScores


def _check(n_remove: int, num_layers: int) -> None:
    if not 1 <= n_remove < num_layers:
        raise LayerfoldError(
            f"cannot remove {n_remove} of {num_layers} layers (choose 1 to {num_layers - 1})"
        )


def streamline_block(scores: LayerScores, n_remove: int) -> list[int]:
    """LLM-Streamline's criterion: the n consecutive layers whose input and output are most
    similar (highest mean cosine of h[l] and h[l+n])."""
    _check(n_remove, scores.num_layers)
    sims = scores.block_cosine(n_remove)
    start = max(range(len(sims)), key=lambda l: (sims[l], -l))
    return list(range(start, start + n_remove))


def angular_block(scores: LayerScores, n_remove: int) -> list[int]:
    """Gromov et al.: the n-layer block with the smallest angular distance on last tokens."""
    _check(n_remove, scores.num_layers)
    dist = scores.block_angular(n_remove)
    start = min(range(len(dist)), key=lambda l: (dist[l], l))
    return list(range(start, start + n_remove))


def block_influence(scores: LayerScores, n_remove: int) -> list[int]:
    """ShortGPT: the n layers with the lowest Block Influence, not necessarily adjacent."""
    _check(n_remove, scores.num_layers)
    bi = scores.block_influence
    order = sorted(range(len(bi)), key=lambda l: (bi[l], l))
    return sorted(order[:n_remove])


def last_layers(num_layers: int, n_remove: int) -> list[int]:
    """Reassessing Layer Pruning: drop the last n layers (the final norm stays)."""
    _check(n_remove, num_layers)
    return list(range(num_layers - n_remove, num_layers))


PRUNING_METHODS = {
    "streamline-block": streamline_block,
    "bi": block_influence,
    "angular": angular_block,
    "last-n": None,  # needs no scores
}


def check_target(remove: int | None, sparsity: float | None) -> None:
    """What can be checked before the model is loaded."""
    if remove is not None and sparsity is not None:
        raise LayerfoldError("give either --remove or --sparsity, not both")
    if sparsity is not None and (math.isnan(sparsity) or not 0 < sparsity < 1):
        raise LayerfoldError(
            f"--sparsity must be a fraction between 0 and 1, exclusive (got {sparsity:g}); "
            "for 25% use 0.25 or 25%"
        )
    if remove is not None and remove < 1:
        raise LayerfoldError(f"--remove must be at least 1 (got {remove})")


def layers_for_target(num_layers: int, remove: int | None, sparsity: float | None) -> int:
    """Turn ``--remove N`` or ``--sparsity F`` (fraction of decoder layers' parameters) into N.

    All layers of one model have the same size, so a fraction of decoder parameters is the
    same fraction of layers; it is rounded to the nearest whole layer.
    """
    check_target(remove, sparsity)
    if sparsity is not None:
        remove = max(1, round(sparsity * num_layers))
    if remove is None:
        remove = max(1, round(0.25 * num_layers))
    _check(remove, num_layers)
    return remove
