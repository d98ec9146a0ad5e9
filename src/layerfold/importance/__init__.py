"""Importance criteria, all computed from one layer-by-layer calibration pass."""

from __future__ import annotations

import torch

from .criteria import LayerScores, SimilarityObserver
from .layer_pass import DEFAULT_ACTIVATION_BYTES, LayerPassOptions, layer_pass


def activation_bytes_per_batch(hidden: int, num_layers: int, rows: int, seq_len: int) -> int:
    """What the importance pass keeps per batch: the running state (fp32) and every layer's
    unit vectors (fp16), for the block scores of every window."""
    return rows * seq_len * hidden * (4 + 2 * (num_layers + 1))


def measure_similarity(
    model,
    arch,
    input_ids: torch.Tensor,
    *,
    batch_size: int = 8,
    max_activation_bytes: int = DEFAULT_ACTIVATION_BYTES,
    progress: bool = True,
) -> LayerScores:
    """One pass over ``input_ids``; returns cosine, Block Influence and angular scores.

    As many batches as fit in ``max_activation_bytes`` go through each layer together, so a
    lazily loaded model reads each layer's weights once per chunk, not once per batch.
    """
    from ..models.surgery import decoder_layers

    num_layers = len(decoder_layers(model, arch))
    obs = SimilarityObserver(num_layers)
    rows = min(batch_size, input_ids.shape[0])
    per_batch = activation_bytes_per_batch(model.config.hidden_size, num_layers, rows, input_ids.shape[1])
    chunk = max(1, max_activation_bytes // max(per_batch, 1))
    layer_pass(
        model,
        arch,
        input_ids,
        batch_size=batch_size,
        chunk_batches=chunk,
        on_chunk_start=obs.on_chunk_start,
        observe=obs,
        on_chunk_end=obs.on_chunk_end,
        progress=progress,
        desc="measuring layer importance",
    )
    return obs.scores()


__all__ = ["DEFAULT_ACTIVATION_BYTES", "activation_bytes_per_batch", "LayerPassOptions", "LayerScores", "measure_similarity"]
