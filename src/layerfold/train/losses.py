"""Training losses as small composable objects.

Each loss says what it needs (teacher logits, which decoder layers' outputs of the student
and of the teacher) and computes one scalar from a :class:`LossInputs`. The loop collects
exactly what the losses ask for, sums ``weight * loss`` and logs every term by name.

Hidden states are the raw outputs of decoder layers (captured by forward hooks), never the
last entry of ``output_hidden_states``, which already has the final norm applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..eval.heldout import kl_terms



@dataclass
class TeacherOutputs:
    """What the teacher says about one batch: full logits, or its final hidden states and
    output head (on the fly), or a top-k summary (from a cache), plus the outputs of some of
    its decoder layers."""

    logits: torch.Tensor | None = None  # [B, T, V]
    final_hidden: torch.Tensor | None = None  # [B, T, H]: logits = head(final_hidden), chunk by chunk
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    topk_values: torch.Tensor | None = None  # [B, T, K] teacher logits of its K likeliest tokens
    topk_indices: torch.Tensor | None = None  # [B, T, K]
    logsumexp: torch.Tensor | None = None  # [B, T] logsumexp(logits / temperature) over the full vocab
    temperature: float = 1.0  # the temperature ``logsumexp`` was taken at
    hidden: dict[int, torch.Tensor] = field(default_factory=dict)  # teacher layer -> its output
    num_layers: int = 0  # the teacher's decoder layer count (resolves negative layer indices)


@dataclass
class LossInputs:
    """A batch as the losses see it. The student's logits are given either whole (``logits``)
    or as final hidden states and the head that turns them into logits (``final_hidden`` and
    ``head``): then the logit losses work chunk by chunk of positions (:mod:`.head`)."""

    input_ids: torch.Tensor  # [B, T]
    logits: torch.Tensor | None  # student logits [B, T, V], or None (then final_hidden and head)
    hidden: dict[int, torch.Tensor]  # student layer -> its output [B, T, H]
    num_layers: int  # the student's decoder layer count
    teacher: TeacherOutputs | None = None
    final_hidden: torch.Tensor | None = None  # [B, T, H]
    head: object | None = None  # a head.OutputHead
    chunk: int = 0  # positions per chunk through the head; 0: auto


class Loss:
    """Base class: a named, weighted term of the training objective.

    A loss on the output distribution (``needs_logits``) is a mean over positions: it gives
    ``position_sum(logits, x, start, end)``, its sum over the flattened positions
    ``start..end-1`` (b * T + t) whose logits [end - start, V] are given, and ``count(x)``, the
    number of positions it averages over. The objective then never needs the batch's logits
    at once (:func:`logit_terms`)."""

    name = "loss"
    weight: float = 1.0
    needs_teacher_logits = False
    needs_logits = False

    def student_layers(self, num_layers: int) -> set[int]:
        return set()

    def teacher_layers(self, num_layers: int) -> set[int]:
        return set()

    def position_sum(self, logits: torch.Tensor, x: LossInputs, start: int, end: int) -> torch.Tensor:
        raise NotImplementedError  # pragma: no cover - logit losses only

    def count(self, x: LossInputs) -> int:
        raise NotImplementedError  # pragma: no cover - logit losses only

    def position_sum_and_grad(self, logits: torch.Tensor, x: LossInputs, start: int, end: int):
        """``(position_sum, its gradient with respect to logits)`` computed without autograd (the
        gradient [end - start, V] in one buffer, the chunk's logits not modified), or None when
        this loss has no such form. With it the chunked path takes each chunk's gradient in its
        forward pass and never recomputes the chunk (:func:`.head.chunked_sums`)."""
        return None

    def __call__(self, x: LossInputs) -> torch.Tensor:
        if self.needs_logits:
            return logit_terms(x, [self])[self.name]
        raise NotImplementedError  # pragma: no cover - abstract

    def describe(self) -> dict:
        return {"name": self.name, "weight": self.weight}


def logit_terms(x: LossInputs, losses: Sequence[Loss]) -> dict[str, torch.Tensor]:
    """The value of every logit loss in ``losses`` on the batch ``x``: from its full logits, or
    chunk by chunk of positions through the output head, the logits of one chunk at a time
    (recomputed in backward). Both give the same values and gradients up to rounding."""
    losses = [l for l in losses if l.needs_logits]
    if not losses:
        return {}

    def terms(logits, start, end):
        return torch.stack([l.position_sum(logits, x, start, end) for l in losses])

    def terms_and_grads(logits, start, end):
        out = [l.position_sum_and_grad(logits, x, start, end) for l in losses]
        return None if any(o is None for o in out) else out

    if x.logits is not None:
        b, t, v = x.logits.shape
        sums = terms(x.logits.reshape(b * t, v), 0, b * t)
    else:
        from .head import chunked_sums

        sums = chunked_sums(x.final_hidden, x.head, terms, x.chunk, terms_and_grads)
    return {l.name: sums[i] / l.count(x) for i, l in enumerate(losses)}


def _flat(a: torch.Tensor, start: int, end: int, dev) -> torch.Tensor:
    """Positions ``start..end-1`` of a [B, T, ...] tensor, flattened to [end - start, ...]."""
    return a.reshape(-1, *a.shape[2:])[start:end].to(dev)


@dataclass
class NextTokenLoss(Loss):
    """The language-modelling loss: cross-entropy of each next token."""

    weight: float = 1.0
    name = "ce"
    needs_logits = True

    def count(self, x: LossInputs) -> int:
        b, t = x.input_ids.shape
        return b * (t - 1)

    def _targets(self, logits, x, start, end):
        t = x.input_ids.shape[1]
        dev = logits.device  # under a device map the head may sit elsewhere
        pos = torch.arange(start, end, device=dev)
        ids = x.input_ids.reshape(-1).to(dev)
        targets = ids[(pos + 1).clamp_max(ids.numel() - 1)]
        targets = torch.where(pos % t == t - 1, torch.full_like(targets, -100), targets)  # a row's last token
        return targets

    def position_sum(self, logits, x, start, end):
        return F.cross_entropy(logits.float(), self._targets(logits, x, start, end), ignore_index=-100, reduction="sum")

    @torch.no_grad()
    def position_sum_and_grad(self, logits, x, start, end):
        targets = self._targets(logits, x, start, end)
        z = logits.float()
        value = F.cross_entropy(z, targets, ignore_index=-100, reduction="sum")
        # d/dz of -log softmax(z)[target] = softmax(z) - one_hot(target); ignored positions: 0
        grad = torch.softmax(z, dim=-1)
        kept = targets != -100
        grad.mul_(kept.unsqueeze(-1))
        rows = torch.nonzero(kept).squeeze(-1)
        grad.index_put_((rows, targets[rows]), torch.full_like(rows, -1, dtype=grad.dtype), accumulate=True)
        return value, grad


@dataclass
class LogitKL(Loss):
    """KL(teacher || student) on next-token distributions softened by ``temperature``,
    scaled by temperature^2 (Hinton et al.) so its gradient size does not depend on it.

    With full teacher logits (or the teacher's final hidden states and head) this is the
    exact KL. With a top-k cache it is the exact KL between the two distributions
    coarse-grained to K+1 outcomes (each of the teacher's K likeliest tokens, and "anything
    else"): a lower bound of the full KL that needs only K values per token instead of the
    whole vocabulary.
    """

    weight: float = 1.0
    temperature: float = 1.0
    name = "kl"
    needs_teacher_logits = True
    needs_logits = True

    def count(self, x: LossInputs) -> int:
        return x.input_ids.numel()

    def _teacher(self, x):
        if x.teacher is None:
            raise ValueError("LogitKL needs a teacher")
        return x.teacher

    def _teacher_logp(self, x, start, end, dev):
        """The teacher's full log-probabilities [n, V] at the temperature (full logits or head)."""
        t = x.teacher
        if t.logits is not None:
            t_logits = _flat(t.logits, start, end, dev)
        else:
            with torch.no_grad():
                t_logits = t.head(_flat(t.final_hidden, start, end, t.final_hidden.device)).to(dev)
        return torch.log_softmax(t_logits.float() / self.temperature, dim=-1)

    def _topk(self, x, start, end, dev):
        """The teacher's top-k log-probabilities [n, K] at the temperature and their token ids."""
        t = x.teacher
        if abs(t.temperature - self.temperature) > 1e-9:
            raise ValueError(f"the teacher cache was built at temperature {t.temperature}, not {self.temperature}")
        log_p_k = (_flat(t.topk_values, start, end, dev).float() / self.temperature
                   - _flat(t.logsumexp, start, end, dev).float().unsqueeze(-1))
        return log_p_k, _flat(t.topk_indices, start, end, dev).long()

    def _topk_sum(self, log_p_k, log_q_k):
        """The coarse-grained KL (the K tokens and "anything else"), summed over positions, x tau^2."""
        p_k = log_p_k.exp()
        kl = (p_k * (log_p_k - log_q_k)).sum(-1)
        # the rest of the vocabulary as one outcome
        p_rest = (1 - p_k.sum(-1)).clamp_min(1e-12)
        q_rest = (1 - log_q_k.exp().sum(-1)).clamp_min(1e-12)
        kl = kl + p_rest * (p_rest.log() - q_rest.log())
        return kl.sum() * self.temperature * self.temperature

    def position_sum(self, logits, x, start, end):
        t = self._teacher(x)
        tau = self.temperature
        dev = logits.device
        if t.logits is not None or t.final_hidden is not None:
            kl = kl_terms(logits.float() / tau, self._teacher_logp(x, start, end, dev))
            return kl.sum() * tau * tau
        log_p_k, idx = self._topk(x, start, end, dev)
        log_q = torch.log_softmax(logits.float() / tau, dim=-1)
        return self._topk_sum(log_p_k, log_q.gather(-1, idx))

    @torch.no_grad()
    def position_sum_and_grad(self, logits, x, start, end):
        t = self._teacher(x)
        tau = self.temperature
        dev = logits.device
        z = logits.float()
        s = z / tau if tau != 1 else z  # x / 1 == x exactly: the same values as position_sum's
        if t.logits is not None or t.final_hidden is not None:
            log_p = self._teacher_logp(x, start, end, dev)
            log_q = torch.log_softmax(s, dim=-1)
            value = (log_p.exp() * (log_p - log_q)).sum() * tau * tau
            # d/ds of sum p (log p - log_softmax(s)) = q - p; ds/dz = 1 / tau; x tau^2
            grad = log_q.exp_().sub_(log_p.exp_()).mul_(tau)
            return value, grad
        log_p_k, idx = self._topk(x, start, end, dev)
        # log_softmax as position_sum takes it (the same values to the bit), then its buffer
        # becomes the gradient's
        log_q = torch.log_softmax(s, dim=-1)
        del s
        leaf = log_q.gather(-1, idx).requires_grad_()
        # the [n, K] part by autograd, then through log_softmax + gather by hand:
        # d log q_k / d s_j = [j == idx_k] - q_j
        with torch.enable_grad():
            value = self._topk_sum(log_p_k, leaf)
            (g,) = torch.autograd.grad(value, leaf)
        grad = log_q.exp_()  # q
        grad.mul_(-g.sum(-1, keepdim=True)).scatter_add_(-1, idx, g)
        if tau != 1:
            grad.div_(tau)
        return value.detach(), grad

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
        total = torch.zeros((), dtype=torch.float32, device=x.input_ids.device)
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
