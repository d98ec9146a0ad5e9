"""One training loop for every method: healing, FoldGPT's cure, replacement layers.

    from layerfold.train import train, TrainConfig, NextTokenLoss, LogitKL, HiddenMSE, tail_map

    result = train(student, ids, TrainConfig(steps=50, lr=1e-4),
                   [LogitKL(weight=1.0, temperature=2.0), HiddenMSE(tail_map(3), weight=0.5)],
                   teacher=original_model,                       # or build_teacher_cache(...)
                   trainable=lambda name, p: ".layers.2" in name)  # or None: keep requires_grad

``ids`` is a LongTensor [rows, seq_len] (e.g. from ``layerfold.data.calibration.load_calibration``).
"""

from .capture import layer_outputs, model_layers, unwrap
from .losses import HiddenMSE, LogitKL, Loss, LossInputs, NextTokenLoss, TeacherOutputs, tail_map
from .loop import TrainConfig, TrainResult, select_trainable, steps_for_tokens, train
from .teacher import OnTheFlyTeacher, TeacherCache, build_teacher_cache

__all__ = [
    "train", "TrainConfig", "TrainResult", "steps_for_tokens", "select_trainable",
    "Loss", "LossInputs", "TeacherOutputs", "NextTokenLoss", "LogitKL", "HiddenMSE", "tail_map",
    "OnTheFlyTeacher", "TeacherCache", "build_teacher_cache",
    "layer_outputs", "model_layers", "unwrap",
]
