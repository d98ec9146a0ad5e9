"""Importance criteria, all computed from one layer-by-layer calibration pass."""

from __future__ import annotations

import torch

from .criteria import LayerScores, SimilarityObserver
from .layer_pass import layer_pass


def measure_similarity(
    model, arch, input_ids: torch.Tensor, *, batch_size: int = 8, progress: bool = True
) -> LayerScores:
    """One pass over ``input_ids``; returns cosine, Block Influence and angular scores."""
    from ..models.surgery import decoder_layers

    obs = SimilarityObserver(len(decoder_layers(model, arch)))
    layer_pass(
        model,
        arch,
        input_ids,
        batch_size=batch_size,
        on_chunk_start=obs.on_chunk_start,
        observe=obs,
        on_chunk_end=obs.on_chunk_end,
        progress=progress,
        desc="measuring layer importance",
    )
    return obs.scores()


__all__ = ["LayerScores", "measure_similarity"]
