"""Self-written calibration text: batches are seeded one by one and cached one by one."""

from __future__ import annotations

import pytest
import torch

from layerfold.data import calibration
from layerfold.data.calibration import CalibrationSpec, self_batches
from layerfold.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_batches_of_a_request():
    b = calibration.SELF_BATCH
    assert self_batches(8) == [8]
    assert self_batches(b) == [b]
    assert self_batches(b + 1) == [b, b]
    assert self_batches(3 * b) == [b, b, b]


def test_a_longer_request_reuses_the_cached_batches(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "SELF_BATCH", 2)
    loaded = load_model(tiny_model_dir("llama"))
    calls = []
    real = calibration._generate

    def counting(spec, loaded, picks, seed):
        calls.append((tuple(picks), seed))
        return real(spec, loaded, picks, seed)

    monkeypatch.setattr(calibration, "_generate", counting)
    spec = CalibrationSpec(samples=3, seq_len=12, seed=5)
    three = calibration.load_calibration(spec, loaded, progress=False)
    assert three.shape == (3, 12) and len(calls) == 2  # batches of 2 and 2, cut to 3
    five = calibration.load_calibration(CalibrationSpec(samples=5, seq_len=12, seed=5), loaded, progress=False)
    assert five.shape == (5, 12) and len(calls) == 3  # only the third batch is new
    assert torch.equal(five[:3], three)
    # the third batch is the one an uncached request draws: the same seeds in the same order
    draws = list(calibration._batch_draws(5, [2, 2, 2]))
    assert calls == [(tuple(p), s) for p, s in draws]
    again = calibration.load_calibration(CalibrationSpec(samples=4, seq_len=12, seed=5), loaded, progress=False)
    assert len(calls) == 3 and torch.equal(again, five[:4])
    other_seed = calibration.load_calibration(CalibrationSpec(samples=3, seq_len=12, seed=6), loaded, progress=False)
    assert len(calls) == 5 and not torch.equal(other_seed, three)


def test_a_batch_another_run_is_writing_is_waited_for(tiny_model_dir, tmp_path, monkeypatch):
    """Two runs on a fresh cache: the second waits for the first's batch instead of sampling it again."""
    import threading

    monkeypatch.setenv("LAYERFOLD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(calibration, "SELF_BATCH", 2)
    loaded = load_model(tiny_model_dir("llama"))
    spec = CalibrationSpec(samples=2, seq_len=12, seed=5)
    settings = {k: v for k, v in calibration.asdict(spec).items() if k != "samples"}
    prefix = calibration.json.dumps([calibration._model_fingerprint(loaded), settings, calibration.SELF_PROMPTS],
                                    sort_keys=True, default=str)
    path = calibration._batch_path(prefix, 0, 2)
    ((picks, seed),) = calibration._batch_draws(5, [2])
    written = calibration._generate(spec, loaded, picks, seed)

    lock = calibration.cache_lock(path)
    lock.acquire()  # the "other run" is writing batch 0
    calls, result = [], {}

    def refuse(*args):
        calls.append(args)
        return written

    monkeypatch.setattr(calibration, "_generate", refuse)
    reader = threading.Thread(target=lambda: result.update(ids=calibration.load_calibration(spec, loaded, progress=False)))
    reader.start()
    reader.join(timeout=1.0)
    assert reader.is_alive()  # blocked on the lock, not sampling on its own
    calibration._save_batch(path, written + 1)  # distinct ids: the reader must return these
    lock.release()
    reader.join(timeout=30)
    assert not calls
    assert torch.equal(result["ids"], written + 1)
