"""The shared training loop: losses, teacher cache, checkpoints and exact resume."""

from __future__ import annotations

import copy
import json
from types import SimpleNamespace

import pytest
import torch

from conftest import VOCAB, build_tiny, tiny_tokenizer
from layerfold.errors import LayerfoldError
from layerfold.models.architectures import architecture_for
from layerfold.models.surgery import remove_layers
from layerfold.train import (
    HiddenMSE,
    LogitKL,
    LossInputs,
    NextTokenLoss,
    TeacherOutputs,
    TrainConfig,
    build_teacher_cache,
    tail_map,
    train,
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread


def _data(rows=12, seq=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a learnable pattern: each row repeats a short random motif
    motifs = torch.randint(3, VOCAB, (rows, 4), generator=g)
    return motifs.repeat(1, seq // 4)


def _pruned(teacher):
    student = copy.deepcopy(teacher)
    remove_layers(student, architecture_for(student.config), [2, 3])
    return student


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_next_token_loss_decreases():
    model = build_tiny("llama")
    r = train(model, _data(), TrainConfig(steps=15, lr=3e-3, batch_size=4, progress=False), [NextTokenLoss()])
    losses = [h["loss"] for h in r.history]
    assert len(losses) == 15 and r.tokens == 15 * 4 * 24
    assert losses[-1] < 0.7 * losses[0]


def test_distillation_loss_decreases_and_only_chosen_parameters_change():
    teacher = build_tiny("llama")
    student = _pruned(teacher)
    before = _params(student)
    losses = [LogitKL(weight=1.0, temperature=2.0), HiddenMSE(tail_map(2), weight=0.5)]
    r = train(student, _data(), TrainConfig(steps=12, lr=2e-3, batch_size=4, progress=False), losses,
              teacher=teacher, trainable=lambda n, p: ".layers.3." in n)
    first, last = r.history[0], r.history[-1]
    assert last["loss_kl"] < first["loss_kl"] and last["loss_mse"] < first["loss_mse"]
    after = _params(student)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".layers.3." in n for n in changed)
    assert all(not p.requires_grad or ".layers.3." in n for n, p in student.named_parameters())


def test_hidden_mse_is_zero_against_itself():
    teacher = build_tiny("llama")
    student = copy.deepcopy(teacher)
    r = train(student, _data(rows=4), TrainConfig(steps=1, lr=1e-9, batch_size=4, progress=False),
              [HiddenMSE({0: 0, -1: -1})], teacher=teacher)
    assert r.history[0]["loss_mse"] == pytest.approx(0.0, abs=1e-10)


def test_topk_kl_is_exact_with_the_whole_vocabulary_and_a_lower_bound_otherwise():
    torch.manual_seed(0)
    s, t = torch.randn(2, 5, VOCAB), torch.randn(2, 5, VOCAB) * 3
    ids = torch.zeros(2, 5, dtype=torch.long)
    kl = LogitKL(temperature=2.0)
    exact = kl(LossInputs(ids, s, {}, 1, TeacherOutputs(logits=t)))
    for k, check in ((VOCAB, "equal"), (8, "below")):
        top = t.topk(k, dim=-1)
        cached = TeacherOutputs(topk_values=top.values, topk_indices=top.indices,
                                logsumexp=torch.logsumexp(t / 2.0, dim=-1), temperature=2.0)
        approx = kl(LossInputs(ids, s, {}, 1, cached))
        if check == "equal":
            assert approx.item() == pytest.approx(exact.item(), rel=1e-4)
        else:
            assert 0 < approx.item() < exact.item()


def test_cached_teacher_trains_like_the_live_one(tmp_path):
    teacher = build_tiny("llama")
    loaded = SimpleNamespace(model=teacher, arch=architecture_for(teacher.config), source="tiny",
                             tokenizer=tiny_tokenizer())
    data = _data()
    cache = build_teacher_cache(loaded, data, topk=VOCAB, temperature=1.0, layers=[-1], batch_size=5,
                                folder=tmp_path / "cache", progress=False)
    assert cache.values.shape == (12, 24, VOCAB) and set(cache.hidden) == {5}
    cfg = TrainConfig(steps=3, lr=1e-3, batch_size=4, progress=False)
    losses = [LogitKL(), HiddenMSE({-1: -1})]
    live, cached = _pruned(teacher), _pruned(teacher)
    r1 = train(live, data, cfg, losses, teacher=teacher)
    r2 = train(cached, data, cfg, losses, teacher=cache)
    # fp16 storage of the teacher's values is the only difference
    for a, b in zip(r1.history, r2.history):
        assert a["loss_kl"] == pytest.approx(b["loss_kl"], rel=2e-2, abs=1e-4)
        assert a["loss_mse"] == pytest.approx(b["loss_mse"], rel=2e-2)
    # built once, then reused
    again = build_teacher_cache(loaded, data, topk=VOCAB, layers=[-1], folder=tmp_path / "cache", progress=False)
    assert again.folder == cache.folder


class _Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(tmp_path):
    teacher = build_tiny("llama")
    data = _data(rows=10)  # 10 rows, batches of 4: passes over the data straddle batches

    def run(folder, kill_at=None, resume=False, student=None):
        student = student or _pruned(teacher)
        cfg = TrainConfig(steps=7, lr=2e-3, batch_size=4, grad_accum=2, warmup_steps=2, weight_decay=0.01,
                          checkpoint_dir=str(folder), checkpoint_every=2, resume=resume,
                          log_file=str(folder / "log.jsonl"), progress=False)

        def on_step(step, record):
            if step == kill_at:
                raise _Killed

        r = train(student, data, cfg, [NextTokenLoss(weight=0.5), LogitKL(temperature=2.0)], teacher=teacher,
                  on_step=on_step)
        return student, r

    straight, r_straight = run(tmp_path / "a")
    with pytest.raises(_Killed):
        run(tmp_path / "b", kill_at=5)  # last checkpoint at step 4: step 5 is done again
    logged = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2, 3, 4, 5]
    resumed, r_resumed = run(tmp_path / "b", resume=True)
    assert r_resumed.resumed_from == 4
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
    assert [h["loss"] for h in r_resumed.history] == [h["loss"] for h in r_straight.history]
    logged = [json.loads(l) for l in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 8))


def test_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    data = _data()
    cfg = TrainConfig(steps=2, lr=1e-3, batch_size=4, checkpoint_dir=str(tmp_path), checkpoint_every=1,
                      progress=False)
    train(build_tiny("llama"), data, cfg, [NextTokenLoss()])
    cfg.resume, cfg.lr = True, 5e-4
    with pytest.raises(LayerfoldError, match="different run"):
        train(build_tiny("llama"), data, cfg, [NextTokenLoss()])
    cfg.lr = 1e-3  # the same settings and data, another model of the same shape: refused too
    with pytest.raises(LayerfoldError, match="different run"):
        train(build_tiny("llama", seed=1), data, cfg, [NextTokenLoss()])
    train(build_tiny("llama"), data, cfg, [NextTokenLoss()])  # the same model: resumes


def test_bad_inputs_are_user_errors():
    model = build_tiny("llama")
    with pytest.raises(LayerfoldError, match="need a teacher"):
        train(model, _data(), TrainConfig(steps=1, progress=False), [LogitKL()])
    with pytest.raises(LayerfoldError, match="nothing to train"):
        train(model, _data(), TrainConfig(steps=1, progress=False), [NextTokenLoss()], trainable=lambda n, p: False)
    with pytest.raises(LayerfoldError, match="at least 1"):
        train(model, _data(), TrainConfig(steps=0, progress=False), [NextTokenLoss()])


def test_replacement_training_resumes_to_the_same_best_state(tmp_path):
    """LLM-Streamline's pair regression through the one loop: validation, the best state kept,
    and a run killed after a checkpoint resumes to the same replacement as an uninterrupted one."""
    from layerfold.data.pairs import PairStore
    from layerfold.methods.streamline import PairRegression, collect_pairs
    from layerfold.models.architectures import ARCHITECTURES
    from layerfold.train import fit, mean_loss

    arch = ARCHITECTURES["llama"]
    ids = _data(rows=10, seq=16)
    store = PairStore(tmp_path / "pairs", 10, 16, 64, "fp32")
    collect_pairs(build_tiny("llama"), arch, ids, 1, 3, store, progress=False)

    def run(folder, kill_at=None, resume=False):
        model = build_tiny("llama")
        remove_layers(model, arch, [2, 3])  # layer 1 stands in for the block 1..3
        objective = PairRegression(model, arch, 1, store, "mse")
        train_rows, val_rows = [0, 2, 3, 5, 6, 7, 8, 9], [1, 4]  # the rows the former seeded split chose
        cfg = TrainConfig(steps=6, batch_size=2, grad_accum=2, lr=3e-3, warmup_steps=1, eval_every=2,
                          checkpoint_dir=str(folder), checkpoint_every=2, resume=resume, progress=False)

        def on_step(step, record):
            if step == kill_at:
                raise _Killed

        r = fit(objective.layer, objective, cfg, rows=train_rows, validate=mean_loss(objective, val_rows, 2),
                on_step=on_step)
        return objective.layer, r

    straight, r_straight = run(tmp_path / "a")
    assert r_straight.best_val < r_straight.first_val
    with pytest.raises(_Killed):
        run(tmp_path / "b", kill_at=5)
    resumed, r_resumed = run(tmp_path / "b", resume=True)
    assert r_resumed.resumed_from == 4
    assert (r_resumed.best_step, r_resumed.best_val) == (r_straight.best_step, r_straight.best_val)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.equal(a, b), n
