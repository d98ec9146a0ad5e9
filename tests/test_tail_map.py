"""Tail-layer distillation follows the layer map: student layer j against teacher layer kept[j].

The constructed teacher has exactly idle layers 3 and 4 (zeroed output projections); removing
them leaves a student that computes the same function, layer for layer: its layer j outputs
exactly what teacher layer kept[j] does. So the tail MSE of the untrained student is zero with
the right map, and not with the old one, which aligned student layer -3 (the original 1)
with teacher layer -3 (the original 3, whose output is layer 2's).
"""

from __future__ import annotations

import copy
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from conftest import VOCAB, build_tiny, tiny_tokenizer
from layerfold.data.calibration import CalibrationSpec
from layerfold.healing import HealOptions, heal, prepare_teacher
from layerfold.models.architectures import architecture_for
from layerfold.models.surgery import remove_layers
from layerfold.train import HiddenMSE, TrainConfig, tail_map, train

pytestmark = pytest.mark.usefixtures("one_thread")

IDLE = [3, 4]


def _teacher_and_student():
    teacher = build_tiny("llama", layers=6)
    with torch.no_grad():
        for l in IDLE:
            teacher.model.layers[l].self_attn.o_proj.weight.zero_()
            teacher.model.layers[l].mlp.down_proj.weight.zero_()
    student = copy.deepcopy(teacher)
    kept = remove_layers(student, architecture_for(student.config), IDLE)
    return teacher, student, kept


def _data(rows=4, seq=24):
    return torch.randint(3, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(0))


def test_tail_map_by_hand():
    assert tail_map(3) == {-1: -1, -2: -2, -3: -3}  # nothing removed
    assert tail_map(3, [0, 1, 2, 5]) == {1: 1, 2: 2, 3: -1}
    assert tail_map(2, [0, 1, 2, 3]) == {2: 2, 3: -1}  # the last two removed: the final output to the final output
    # a replacement module for layers 1-3 stands for layer 3, the one before the next kept layer
    assert tail_map(3, [0, None, 4, 5]) == {1: 3, 2: 4, 3: -1}
    assert tail_map(9, [0, 2]) == {0: 0, 1: -1}  # k larger than the student


def test_the_tail_loss_is_zero_for_a_student_that_is_the_teacher_minus_idle_layers():
    teacher, student, kept = _teacher_and_student()
    assert kept == [0, 1, 2, 5]
    cfg = TrainConfig(steps=1, lr=1e-12, batch_size=4, progress=False)

    def first_mse(layer_map):
        r = train(copy.deepcopy(student), _data(), cfg, [HiddenMSE(layer_map)], teacher=teacher)
        return r.history[0]["loss_mse"]

    assert first_mse(tail_map(3, kept)) == pytest.approx(0.0, abs=1e-10)
    assert first_mse(tail_map(3)) > 1e-3  # the old map: student 1 against teacher 3


def test_healing_mse_uses_the_layer_map_and_caches_those_teacher_layers():
    teacher, student, kept = _teacher_and_student()
    tok = tiny_tokenizer()
    t = SimpleNamespace(model=teacher, arch=architecture_for(teacher.config), source="tiny-idle", tokenizer=tok)
    s = SimpleNamespace(model=student, arch=architecture_for(student.config), source="student", tokenizer=tok)
    opts = HealOptions(tokens=4 * 24, data=CalibrationSpec(seq_len=24), batch_size=4, train="layers",
                       layers="all", kl=0.0, mse=1.0, mse_layers=3, lr=1e-12, topk=8, progress=False)
    ids = _data()
    cache = prepare_teacher(opts, t, ids, kept)
    assert sorted(cache.hidden) == [1, 2, 5]
    r = heal(s, None, opts, ids=ids, prepared_teacher=cache, layer_map=kept)
    assert r.train.history[0]["loss_mse"] == pytest.approx(0.0, abs=1e-6)  # fp16 cache
    # before the layer map is known, the cache holds every layer the tail can come from
    spare = prepare_teacher(replace(opts, mse_layers=2), t, ids, removed=2)
    assert sorted(spare.hidden) == [2, 3, 4, 5]
