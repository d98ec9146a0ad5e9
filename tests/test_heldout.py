"""Held-out agreement figures against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import build_tiny

from layerfold.errors import LayerfoldError
from layerfold.eval.heldout import compare_to_reference, kl_terms, reference_log_probs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_kl_terms_match_a_two_token_case_by_hand():
    # reference p = (0.75, 0.25); student q = softmax(0, log 3) = (0.25, 0.75)
    ref = torch.log(torch.tensor([[0.75, 0.25]]))
    student = torch.tensor([[0.0, math.log(3.0)]])
    expected = 0.75 * math.log(0.75 / 0.25) + 0.25 * math.log(0.25 / 0.75)
    assert kl_terms(student, ref).item() == pytest.approx(expected, rel=1e-6)


def test_a_model_against_itself_and_against_another():
    a, b = build_tiny("llama", seed=0), build_tiny("llama", seed=1)
    ids = torch.randint(3, 200, (3, 12), generator=torch.Generator().manual_seed(0))
    ref = reference_log_probs(a, ids, batch_size=2)
    same = compare_to_reference(a, ids, ref, batch_size=2)
    assert same.top1 == 1.0
    assert abs(same.kl) < 1e-3  # float16 storage of the reference only
    assert same.ppl == pytest.approx(same.reference_ppl, rel=1e-3)

    other = compare_to_reference(b, ids, ref, batch_size=3)
    with torch.no_grad():
        la, lb = a(input_ids=ids).logits.float(), b(input_ids=ids).logits.float()
    pa, pb = F.log_softmax(la, -1), F.log_softmax(lb, -1)
    kl = (pa.exp() * (pa - pb)).sum(-1).mean().item()
    top1 = (la.argmax(-1) == lb.argmax(-1)).float().mean().item()
    nll_b = -pb[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    nll_a = -pa[:, :-1].gather(-1, ids[:, 1:, None]).mean().item()
    assert other.kl == pytest.approx(kl, rel=1e-2)
    assert other.top1 == pytest.approx(top1)
    assert other.ppl == pytest.approx(math.exp(nll_b), rel=1e-4)
    assert other.reference_ppl == pytest.approx(math.exp(nll_a), rel=1e-3)
    assert other.tokens == 36 and other.rows == 3


def test_mismatched_reference_is_refused():
    a = build_tiny("llama")
    ids = torch.randint(3, 200, (2, 8))
    ref = reference_log_probs(a, ids)
    with pytest.raises(LayerfoldError):
        compare_to_reference(a, ids[:, :6], ref)
