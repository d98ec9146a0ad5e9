"""Stability: how many answers a compressed model changed, weighted by the original's confidence.

METHODS.md section 2, as stated there (not as the official script computes it): for each
multiple-choice example i, s_i is the standard deviation of the original model's per-choice
scores, w = softmax(s) over the examples, and

    stability = sum_i w_i * [compressed is correct on i  ==  original is correct on i].

The scores are the ones the metric ranks choices by: summed log-likelihoods for ``acc``,
log-likelihood per character for ``acc_norm``. The standard deviation is the population one
(divisor = number of choices).

With summed log-likelihoods the standard deviations span tens of nats, so the softmax can put
nearly all the weight on one or two examples and the figure saturates (PIQA reads 1.000 while
accuracy falls by 6 points). ``effective_examples`` (1 / sum w_i^2) says how many examples the
figure rests on, and ``agreement`` is the same comparison unweighted; both are reported beside it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def confidence_weights(reference_scores: Sequence[Sequence[float]]) -> np.ndarray:
    """softmax over examples of the std of each example's per-choice scores."""
    s = np.array([np.std(np.asarray(row, dtype=np.float64)) for row in reference_scores])
    e = np.exp(s - s.max())
    return e / e.sum()


def stability(reference_scores: Sequence[Sequence[float]], reference_correct: Sequence[bool],
              compressed_correct: Sequence[bool]) -> float:
    if not (len(reference_scores) == len(reference_correct) == len(compressed_correct)):
        raise ValueError("stability needs the same examples in both results")
    w = confidence_weights(reference_scores)
    agree = np.asarray(reference_correct, dtype=bool) == np.asarray(compressed_correct, dtype=bool)
    return float((w * agree).sum())


def effective_examples(reference_scores: Sequence[Sequence[float]]) -> float:
    """Kish's effective sample size of the stability weights: n when uniform, 1 when one example has them all."""
    w = confidence_weights(reference_scores)
    return float(1.0 / (w * w).sum())


def agreement(reference_correct: Sequence[bool], compressed_correct: Sequence[bool]) -> float:
    """Share of examples where the compressed model is right exactly when the original is (unweighted)."""
    if len(reference_correct) != len(compressed_correct):
        raise ValueError("agreement needs the same examples in both results")
    return float(np.mean(np.asarray(reference_correct, dtype=bool) == np.asarray(compressed_correct, dtype=bool)))
