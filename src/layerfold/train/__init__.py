"""One training loop for every method: healing, FoldGPT's cure, LLM-Streamline's replacement.

    from layerfold.train import train, TrainConfig, NextTokenLoss, LogitKL, HiddenMSE, tail_map

    result = train(student, ids, TrainConfig(steps=50, lr=1e-4),
                   [LogitKL(weight=1.0, temperature=2.0), HiddenMSE(tail_map(3), weight=0.5)],
                   teacher=original_model,                       # or build_teacher_cache(...)
                   trainable=lambda name, p: ".layers.2" in name)  # or None: keep requires_grad

``ids`` is a LongTensor [rows, seq_len] (e.g. from ``layerfold.data.calibration.load_calibration``).
``fit(model, objective, config, rows=..., validate=...)`` is the same loop for any objective
(LLM-Streamline trains its replacement on cached pairs with it), with best-state keeping.
"""

from .capture import layer_outputs, model_layers, unwrap
from .losses import HiddenMSE, LogitKL, Loss, LossInputs, NextTokenLoss, TeacherOutputs, tail_map
from .loop import (
    Checkpoints,
    Distillation,
    Objective,
    TrainConfig,
    TrainResult,
    fit,
    lr_factor,
    mean_loss,
    select_trainable,
    steps_for_tokens,
    train,
)
from .teacher import OnTheFlyTeacher, TeacherCache, build_teacher_cache

__all__ = [
    "train", "fit", "TrainConfig", "TrainResult", "Checkpoints", "Objective", "Distillation", "mean_loss",
    "lr_factor", "steps_for_tokens", "select_trainable",
    "Loss", "LossInputs", "TeacherOutputs", "NextTokenLoss", "LogitKL", "HiddenMSE", "tail_map",
    "OnTheFlyTeacher", "TeacherCache", "build_teacher_cache",
    "layer_outputs", "model_layers", "unwrap",
]
