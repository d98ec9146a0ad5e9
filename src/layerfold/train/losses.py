"""Training losses as small composable objects.

Each loss says what it needs (teacher logits, which decoder layers' outputs of the student
and of the teacher) and computes one scalar from a :class:`LossInputs`. The loop collects
exactly what the losses ask for, sums ``weight * loss`` and logs every term by name.

Hidden states are the raw outputs of decoder layers (captured by forward hooks), never the
last entry of ``output_hidden_states``, which already has the final norm applied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..eval.heldout import kl_terms


@dataclass
class TeacherOutputs:
    """What the teacher says about one batch: full logits (on the fly) or a top-k summary
    (from a cache), plus the outputs of some of its decoder layers."""

    logits: torch.Tensor | None = None  # [B, T, V]
    topk_values: torch.Tensor | None = None  # [B, T, K] teacher logits of its K likeliest tokens
    topk_indices: torch.Tensor | None = None  # [B, T, K]
    logsumexp: torch.Tensor | None = None  # [B, T] logsumexp(logits / temperature) over the full vocab
    temperature: float = 1.0  # the temperature ``logsumexp`` was taken at
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> its output
    num_layers: int = 0  # the teacher's decoder layer count (resolves negative layer indices)


@dataclass
class LossInputs:
    input_ids: torch.Tensor  # [B, T]
    logits: torch.Tensor  # student logits [B, T, V]
    hidden: dict[int, torch.Tensor]  # student layer -> its output [B, T, H]
    num_layers: int  # the student's decoder layer count
    teacher: TeacherOutputs | None = None


class Loss:
    """Base class: a named, weighted term of the training objective."""

    name = "loss"
    weight: float = 1.0
    needs_teacher_logits = False

    def student_layers(self, num_layers: int) -> set[int]:
        return set()

    def teacher_layers(self, num_layers: int) -> set[int]:
        return set()

    def __call__(self, x: LossInputs) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight}


@dataclass
class NextTokenLoss(Loss):
    """The language-modelling loss: cross-entropy of each next token."""

    weight: float = 1.0
    name = "ce"

    def __call__(self, x: LossInputs) -> torch.Tensor:
        logits = x.logits[:, :-1].float()
        targets = x.input_ids[:, 1:].to(logits.device)  # under a device map the head may sit elsewhere
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@dataclass
class LogitKL(Loss):
    """KL(teacher || student) on next-token distributions softened by ``temperature``,
    scaled by temperature^2 (Hinton et al.) so its gradient size does not depend on it.

    With full teacher logits this is the exact KL. With a top-k cache it is the exact KL
    between the two distributions coarse-grained to K+1 outcomes (each of the teacher's K
    likeliest tokens, and "anything else"): a lower bound of the full KL that needs only
    K values per token instead of the whole vocabulary.
    """

    weight: float = 1.0
    temperature: float = 1.0
    name = "kl"
    needs_teacher_logits = True

    def __call__(self, x: LossInputs) -> torch.Tensor:
        t = x.teacher
        if t is None:
            raise ValueError("LogitKL needs a teacher")
        tau = self.temperature
        log_q = torch.log_softmax(x.logits.float() / tau, dim=-1)
        dev = log_q.device
        if t.logits is not None:
            kl = kl_terms(x.logits.float() / tau, torch.log_softmax(t.logits.to(dev).float() / tau, dim=-1))
        else:
            if abs(t.temperature - tau) > 1e-9:
                raise ValueError(f"the teacher cache was built at temperature {t.temperature}, not {tau}")
            log_p_k = t.topk_values.to(dev).float() / tau - t.logsumexp.to(dev).float().unsqueeze(-1)
            log_q_k = log_q.gather(-1, t.topk_indices.to(dev).long())
            p_k = log_p_k.exp()
            kl = (p_k * (log_p_k - log_q_k)).sum(-1)
            # the rest of the vocabulary as one outcome
            p_rest = (1 - p_k.sum(-1)).clamp_min(1e-12)
            q_rest = (1 - log_q_k.exp().sum(-1)).clamp_min(1e-12)
            kl = kl + p_rest * (p_rest.log() - q_rest.log())
        return kl.mean() * tau * tau

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight, "temperature": self.temperature}


@dataclass
class HiddenMSE(Loss):
    """MSE between student and teacher decoder-layer outputs, for aligned layer pairs.

    ``layer_map`` maps a student layer index to the teacher layer whose output it should
    reproduce. Negative indices count from the end; ``tail_map(3, kept)`` aligns the last
    three layers of the student with the teacher layers they came from (FoldGPT's
    tail-layer distillation). With ``relative`` (default)
    each pair's MSE is divided by the teacher output's mean square, so layers with large
    activations do not dominate and the weight means the same on any model.
    """

    layer_map: dict[int, int] = field(default_factory=dict)
    weight: float = 1.0
    relative: bool = True
    name = "mse"

    def student_layers(self, num_layers: int) -> set[int]:
        return {s % num_layers for s in self.layer_map}

    def teacher_layers(self, num_layers: int) -> set[int]:
        return {t % num_layers for t in self.layer_map.values()}

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if x.teacher is None:
            raise ValueError("HiddenMSE needs a teacher")
        total = x.logits.new_zeros((), dtype=torch.float32)
        for s, t in self.layer_map.items():
            hs = x.hidden[s % x.num_layers]
            ht = x.teacher.hidden[t % x.teacher.num_layers].to(hs.device).float()  # layers may sit on other devices
            err = F.mse_loss(hs.float(), ht)
            if self.relative:
                err = err / ht.pow(2).mean().clamp_min(1e-12)
            total = total + err.to(total.device)
        return total / max(1, len(self.layer_map))

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight, "layer_map": dict(self.layer_map),
                "relative": self.relative}


def tail_map(k: int, kept: Sequence[int | None] | None = None) -> dict[int, int]:
    """Tail-layer distillation pairs: each of the student's last ``k`` layers -> the teacher
    layer whose output it should reproduce.

    ``kept`` is the layer map of the surgery (``kept[j]``: the original index of student layer
    j). Student layer j is matched to teacher layer ``kept[j]``, the layer it came from, and
    the student's last layer to the teacher's last (the final output to the final output).
    A replacement module (``kept[j]`` None, LLM-Streamline) stands for the block it replaced,
    so it is matched to the last layer of that block, the one before the next kept layer.
    Without a map (nothing removed) this is {-1: -1, ..., -k: -k}.
    """
    if kept is None:
        return {-i: -i for i in range(1, k + 1)}
    m = len(kept)
    pairs = {}
    for j in range(max(0, m - k), m):
        if j == m - 1:
            pairs[j] = -1
        elif kept[j] is not None:
            pairs[j] = kept[j]
        elif kept[j + 1] is not None:
            pairs[j] = kept[j + 1] - 1
        else:
            raise ValueError(f"layer map {list(kept)}: two replaced blocks in a row; tail layers are ambiguous")
    return pairs
