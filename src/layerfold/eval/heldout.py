"""Quality figures that need no data set: how closely a model follows its original on
held-out rows of calibration-style text.

The held-out rows are text the original writes itself with a seed of their own
(``HELDOUT_SEED``: calibration uses 0, healing text 1), or, for a calibration file, the rows
that follow the calibration rows in it. Selection and healing never see them, so the figures
are honest for every method, and they exist on any machine, with no task files.

    rows = heldout_ids(spec, loaded)                 # [N, T] token ids
    ref = reference_log_probs(original, rows)         # once, before surgery
    fit = compare_to_reference(pruned, rows, ref)     # KL, top-1 agreement, perplexities

``kl`` is the mean over every position of KL(original || model) on the next-token
distribution, ``top1`` the share of positions whose most likely next token is the same, and
``ppl`` / ``reference_ppl`` the perplexities of the model and of the original on the rows.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from ..errors import LayerfoldError

HELDOUT_SEED = 2  # self-written calibration text uses seed 0, healing text seed 1
DEFAULT_HELDOUT_ROWS = 8


def heldout_spec(spec, rows: int = DEFAULT_HELDOUT_ROWS):
    """The calibration spec of the held-out rows for a self-written calibration source."""
    return replace(spec, seed=HELDOUT_SEED, samples=rows)


def heldout_ids(spec, loaded, rows: int = DEFAULT_HELDOUT_ROWS, *, progress: bool = True) -> torch.Tensor:
    """``rows`` sequences of ``spec.seq_len`` tokens that the calibration rows do not contain.

    Self-written text: the original writes them with ``HELDOUT_SEED``. A file or data set:
    the rows right after the calibration rows (an error if the text is too short for both).
    """
    from ..data.calibration import load_calibration, pack_texts, read_texts

    if rows < 1:
        raise LayerfoldError(f"held-out rows must be at least 1 (got {rows})")
    if spec.source == "self":
        return load_calibration(heldout_spec(spec, rows), loaded, progress=progress)
    texts = read_texts(spec.source, spec.text_field, spec.split)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a short text is reported below, in one line
        ids = pack_texts(texts, loaded.tokenizer, spec.samples + rows, spec.seq_len, spec.source)
    if ids.shape[0] <= spec.samples:
        raise LayerfoldError(
            f"{spec.source}: {ids.shape[0]} sequences of {spec.seq_len} tokens, none left for held-out "
            f"rows after the {spec.samples} calibration sequences; give more text or fewer --calib-samples")
    return ids[spec.samples:]


def _device(model) -> torch.device:
    from ..models.loading import input_device

    return input_device(model)


@torch.no_grad()
def reference_log_probs(model, ids: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """The model's next-token log-probabilities on ``ids``, ``[N, T, V]`` float16 on the CPU."""
    device = _device(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, ids.shape[0], batch_size):
            logits = model(input_ids=ids[i : i + batch_size].to(device), use_cache=False).logits
            out.append(F.log_softmax(logits.float(), dim=-1).to(torch.float16).cpu())
    finally:
        model.train(was_training)
    return torch.cat(out)


@dataclass
class HeldoutFit:
    """How a model follows its original on held-out rows (see the module docstring)."""

    kl: float
    top1: float
    ppl: float
    reference_ppl: float
    rows: int
    tokens: int  # positions scored for KL and top-1 (perplexity scores one fewer per row)

    def to_dict(self) -> dict:
        return asdict(self)


def kl_terms(student_logits: torch.Tensor, reference_logp: torch.Tensor) -> torch.Tensor:
    """Per-position KL(reference || student), ``[...]``, from student logits and reference log-probs."""
    s = F.log_softmax(student_logits.float(), dim=-1)
    t = reference_logp.float()
    return (t.exp() * (t - s)).sum(-1)


@torch.no_grad()
def compare_to_reference(model, ids: torch.Tensor, reference_logp: torch.Tensor, batch_size: int = 4) -> HeldoutFit:
    """KL to the reference, top-1 agreement and both perplexities on ``ids``."""
    if reference_logp.shape[:2] != ids.shape:
        raise LayerfoldError(f"reference log-probs {tuple(reference_logp.shape[:2])} do not match the rows {tuple(ids.shape)}")
    device = _device(model)
    was_training = model.training
    model.eval()
    kl_sum = agree = nll = ref_nll = 0.0
    try:
        for i in range(0, ids.shape[0], batch_size):
            rows = ids[i : i + batch_size]
            logits = model(input_ids=rows.to(device), use_cache=False).logits.float()
            ref = reference_logp[i : i + batch_size].to(logits.device).float()
            kl_sum += kl_terms(logits, ref).sum().item()
            agree += (logits.argmax(-1) == ref.argmax(-1)).sum().item()
            target = rows[:, 1:].to(logits.device)
            logp = F.log_softmax(logits[:, :-1], dim=-1)
            nll -= logp.gather(-1, target.unsqueeze(-1)).sum().item()
            ref_nll -= ref[:, :-1].gather(-1, target.unsqueeze(-1)).sum().item()
    finally:
        model.train(was_training)
    n, t = ids.shape
    positions = n * t
    scored = n * (t - 1)
    return HeldoutFit(kl=kl_sum / positions, top1=agree / positions, ppl=math.exp(nll / scored),
                      reference_ppl=math.exp(ref_nll / scored), rows=n, tokens=positions)


def reference_fit(ids: torch.Tensor, reference_logp: torch.Tensor) -> HeldoutFit:
    """The original against itself: KL 0, top-1 1, and its own perplexity on ``ids`` (from its
    log-probabilities, no second forward pass)."""
    if reference_logp.shape[:2] != ids.shape:
        raise LayerfoldError(f"reference log-probs {tuple(reference_logp.shape[:2])} do not match the rows {tuple(ids.shape)}")
    n, t = ids.shape
    nll = -reference_logp[:, :-1].float().gather(-1, ids[:, 1:].unsqueeze(-1)).sum().item()
    ppl = math.exp(nll / (n * (t - 1)))
    return HeldoutFit(kl=0.0, top1=1.0, ppl=ppl, reference_ppl=ppl, rows=n, tokens=n * t)
