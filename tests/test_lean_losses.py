"""Logit losses chunk by chunk through the output head (train/head.py): the same values and
gradients as the full-logit path, for every architecture and loss, and never the batch's
full-vocabulary logits at once."""

from __future__ import annotations

import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import ARCH_CONFIGS, VOCAB, build_tiny, tiny_tokenizer
from layerfold.models.architectures import architecture_for
from layerfold.models.surgery import remove_layers
from layerfold.train import HiddenMSE, LogitKL, NextTokenLoss, build_teacher_cache
from layerfold.train.loop import Distillation

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

ROWS, SEQ, CHUNK = 3, 10, 7  # 30 positions in chunks of 7: the last chunk is short, chunks cross rows


def _data(rows=6, seq=SEQ, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (rows, seq), generator=g)


def _student(teacher, head_trains=True):
    """A trainable student; with ``head_trains=False`` its output head (and a tied embedding) frozen,
    as in LoRA healing: then the chunks take their gradients in forward (train/head.py)."""
    student = copy.deepcopy(teacher).train()
    remove_layers(student, architecture_for(student.config), [2])
    for p in student.parameters():
        p.requires_grad_(True)
    if not head_trains:
        student.get_output_embeddings().weight.requires_grad_(False)
    return student


def _loaded(model):
    return SimpleNamespace(model=model, arch=architecture_for(model.config), source="tiny", tokenizer=tiny_tokenizer())


def _loss_and_grads(student, data, losses, teacher, chunk):
    objective = Distillation(student, data, losses, teacher=teacher, logit_chunk=chunk)
    student.zero_grad(set_to_none=True)
    total, terms = objective(list(range(ROWS)), contextlib.nullcontext())
    total.backward()
    grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    return {k: v.item() for k, v in terms.items()}, grads


def _assert_same(a, b, tol=1e-6):
    (terms_a, grads_a), (terms_b, grads_b) = a, b
    assert terms_a.keys() == terms_b.keys()
    for k in terms_a:
        assert abs(terms_a[k] - terms_b[k]) <= tol * max(1.0, abs(terms_a[k])), k
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.allclose(grads_a[n], grads_b[n], rtol=1e-5, atol=tol), n


@pytest.mark.parametrize("head_trains", [True, False], ids=["head trained (checkpointed chunks)",
                                                           "head frozen (gradients in forward)"])
@pytest.mark.parametrize("model_type", sorted(ARCH_CONFIGS))
def test_chunked_losses_equal_the_full_logit_path(model_type, head_trains, tmp_path):
    teacher = build_tiny(model_type, layers=4)
    data = _data()
    cache = build_teacher_cache(_loaded(teacher), data, topk=16, temperature=2.0, layers=[-1], batch_size=4,
                                folder=tmp_path / "cache", progress=False)
    cache1 = build_teacher_cache(_loaded(teacher), data, topk=16, temperature=1.0, layers=[-1], batch_size=4,
                                 folder=tmp_path / "cache1", progress=False)
    student = _student(teacher, head_trains)
    if model_type == "gemma2":
        student.config.final_logit_softcapping = 0.5  # a cap that matters: its gradient is taken by hand too
    cases = {
        "ce": ([NextTokenLoss()], None),
        "kl, top-k cache": ([LogitKL(temperature=2.0)], cache),
        "kl, top-k cache, temperature 1": ([LogitKL()], cache1),
        "kl, live teacher": ([LogitKL(temperature=2.0)], teacher),
        "ce + kl + mse, top-k cache": ([NextTokenLoss(weight=0.5), LogitKL(temperature=2.0), HiddenMSE({-1: -1})], cache),
    }
    for name, (losses, t) in cases.items():
        full = _loss_and_grads(student, data, losses, t, chunk=-1)
        chunked = _loss_and_grads(student, data, losses, t, chunk=CHUNK)
        _assert_same(full, chunked)
        assert _loss_and_grads(student, data, losses, t, chunk=0)[0].keys() == full[0].keys(), name


def test_chunked_values_equal_independent_formulas(tmp_path):
    """CE against transformers' own loss; the top-k KL against the formula on full logits."""
    teacher = build_tiny("llama", layers=4)
    student = _student(teacher)
    data = _data()
    rows = data[:ROWS]
    with torch.no_grad():
        hf_ce = student(input_ids=rows, labels=rows).loss.item()
        s_logits = student(input_ids=rows).logits / 2.0
        t_logits = teacher(input_ids=rows).logits.float() / 2.0
    (terms, _) = _loss_and_grads(student, data, [NextTokenLoss()], None, chunk=CHUNK)
    assert terms["ce"] == pytest.approx(hf_ce, rel=1e-6)

    k = 16
    cache = build_teacher_cache(_loaded(teacher), data, topk=k, temperature=2.0, folder=tmp_path / "c", progress=False)
    # the cache holds the teacher's top-k logits (fp16) and its logsumexp at the temperature
    top = (t_logits * 2.0).topk(k, dim=-1)
    assert torch.equal(torch.from_numpy(cache.indices[:ROWS].copy()).long(), top.indices)
    assert torch.allclose(torch.from_numpy(cache.values[:ROWS].astype("float32")), top.values, atol=2e-3)
    assert torch.allclose(torch.from_numpy(cache.lse[:ROWS].copy()), torch.logsumexp(t_logits, -1), atol=1e-5)
    log_p = torch.from_numpy(cache.values[:ROWS].astype("float32")) / 2.0 - torch.from_numpy(cache.lse[:ROWS].copy())[..., None]
    log_q = F.log_softmax(s_logits, -1).gather(-1, top.indices)
    p = log_p.exp()
    p_rest, q_rest = 1 - p.sum(-1), 1 - log_q.exp().sum(-1)
    expected = ((p * (log_p - log_q)).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean() * 4.0
    (terms, _) = _loss_and_grads(student, data, [LogitKL(temperature=2.0)], cache, chunk=CHUNK)
    assert terms["kl"] == pytest.approx(expected.item(), rel=1e-5)


def _head_positions(student, data, losses, teacher, chunk) -> list[int]:
    """Positions the output head computed logits for, call by call, in one loss and backward."""
    sizes = []
    handle = student.get_output_embeddings().register_forward_hook(
        lambda m, a, out: sizes.append(out.shape[:-1].numel()))
    try:
        _loss_and_grads(student, data, losses, teacher, chunk=chunk)
    finally:
        handle.remove()
    return sizes


def test_the_head_never_sees_more_than_a_chunk(tmp_path):
    teacher = build_tiny("llama", layers=4)
    student = _student(teacher)
    data = _data()
    positions = ROWS * SEQ
    # the model's own forward computes no logits (size 0); then 5 chunks, each recomputed in backward
    sizes = _head_positions(student, data, [NextTokenLoss(), LogitKL()], teacher, CHUNK)
    assert max(sizes) == CHUNK and sum(sizes) == 2 * positions, sizes
    frozen = _student(teacher, head_trains=False)
    sizes = _head_positions(frozen, data, [NextTokenLoss(), LogitKL()], teacher, CHUNK)
    assert max(sizes) == CHUNK and sum(sizes) == positions, sizes  # a frozen head: each chunk once
    sizes = _head_positions(student, data, [NextTokenLoss()], None, -1)
    assert sizes == [positions]  # the old path: the whole batch at once


def test_gemma2_logit_cap_is_applied_in_chunks():
    teacher = build_tiny("gemma2", layers=4)
    assert teacher.config.final_logit_softcapping  # the tiny config keeps transformers' default cap
    student = _student(teacher)
    student.config.final_logit_softcapping = 0.5  # a cap that changes the loss a lot
    a = _loss_and_grads(student, _data(), [NextTokenLoss()], None, chunk=-1)
    b = _loss_and_grads(student, _data(), [NextTokenLoss()], None, chunk=CHUNK)
    _assert_same(a, b)
    student.config.final_logit_softcapping = None
    c = _loss_and_grads(student, _data(), [NextTokenLoss()], None, chunk=CHUNK)
    assert abs(c[0]["ce"] - b[0]["ce"]) > 1e-3


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_direct_gradients_equal_autograd_on_a_large_vocabulary(tau):
    """position_sum_and_grad against autograd through position_sum, on logits of the size the
    auto chunk takes (85 x 49,152), with a top-k cache, full teacher logits, and targets."""
    from layerfold.train.losses import TeacherOutputs

    g = torch.Generator().manual_seed(1)
    n, v, k, t = 85, 49152, 64, 17
    logits = torch.randn(n, v, generator=g) * 4
    teacher = torch.randn(n, v, generator=g) * 4
    top = (teacher / tau).topk(k, dim=-1)
    cache = TeacherOutputs(topk_values=top.values.mul(tau).half().float().reshape(5, t, k),
                           topk_indices=top.indices.reshape(5, t, k),
                           logsumexp=torch.logsumexp(teacher / tau, -1).reshape(5, t), temperature=tau)
    ids = torch.randint(0, v, (5, t), generator=g)
    cases = [(LogitKL(temperature=tau), cache), (LogitKL(temperature=tau), TeacherOutputs(logits=teacher.reshape(5, t, v))),
             (NextTokenLoss(), None)]
    for loss, teacher_out in cases:
        x = SimpleNamespace(teacher=teacher_out, input_ids=ids)
        z = logits.clone().requires_grad_()
        expected = loss.position_sum(z, x, 0, n)
        (expected_grad,) = torch.autograd.grad(expected, z)
        value, grad = loss.position_sum_and_grad(logits, x, 0, n)
        assert value.item() == pytest.approx(expected.item(), rel=1e-6), loss
        assert torch.allclose(grad, expected_grad, rtol=1e-5, atol=1e-7), (loss, (grad - expected_grad).abs().max())
        if teacher_out is cache:
            assert value.item() == expected.item()  # the same log_softmax: the same value to the bit
