"""Figures of the original and the compressed model that are only honest when taken together.

Speed. Timed once each, minutes apart, on a machine whose other jobs come and go, the two
models' speeds differ by whatever the neighbours did in between (a 22-layer model once came
out at a third of its 30-layer original's prefill speed). :func:`alternating_speed` times
them in alternation, original then compressed, for several rounds, and compares each round's
pair: the median of the per-round ratios survives a slow phase of the machine that hits both
members of a round alike. When those ratios still spread too widely (more than
``NOISY_SPREAD`` of their median from lowest to highest) the comparison says so instead of
giving a ratio.
"""

from __future__ import annotations

import statistics

import torch

from .cost import _PeakMemory, decode_tokens_per_s, prefill_seconds, weight_bytes

NOISY_SPREAD = 0.20  # (highest - lowest) / median of the per-round ratios above which none is printed
DEFAULT_ROUNDS = 7


def _one_run(model, prompt: torch.Tensor, decode_tokens: int) -> tuple[float, float]:
    """Tokens per second of one prefill over ``prompt`` and of ``decode_tokens`` cached decode steps."""
    return prompt.shape[1] / prefill_seconds(model, prompt), decode_tokens_per_s(model, prompt, decode_tokens)


def compare_runs(reference: list[float], other: list[float]) -> dict:
    """The per-round ratios other / reference: median, lowest, highest, and whether they are
    too spread to quote (``noisy``)."""
    ratios = [o / r for r, o in zip(reference, other)]
    median = statistics.median(ratios)
    spread = (max(ratios) - min(ratios)) / median if median else float("inf")
    return {"ratio": median, "low": min(ratios), "high": max(ratios), "spread": spread,
            "noisy": spread > NOISY_SPREAD, "rounds": len(ratios)}


def alternating_speed(reference, other, *, rounds: int = DEFAULT_ROUNDS, prefill_tokens: int = 64,
                      decode_tokens: int = 16, progress: bool = False) -> dict:
    """Time ``reference`` and ``other`` in alternation (ABAB..., ``rounds`` rounds after one
    untimed warm-up each) on batch 1 with the same random prompt.

    Returns ``{"reference": runs, "other": runs, "prefill": comparison, "decode": comparison}``
    where ``runs`` holds each round's ``prefill``/``decode`` tokens per second, their medians
    and the model's ``peak_memory_bytes`` (as :func:`layerfold.eval.cost.measure_cost` counts
    it), and each comparison is :func:`compare_runs` of the two.
    """
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    models = {"reference": reference, "other": other}
    device = next(reference.parameters()).device
    vocab = min(reference.config.vocab_size, other.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(3, vocab, (1, prefill_tokens), generator=g).to(device)
    runs = {name: {"prefill": [], "decode": [], "peak_memory_bytes": None} for name in models}
    was_training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=rounds, desc="speed (alternating)", unit="round", leave=False)
    try:
        for name, m in models.items():  # warm-up, and each model's peak memory on its own
            with _PeakMemory(device) as mem:
                _one_run(m, prompt, decode_tokens)
            runs[name]["peak_memory_bytes"] = mem.model_peak(weight_bytes(m))
        for _ in range(rounds):
            for name, m in models.items():
                prefill, decode = _one_run(m, prompt, decode_tokens)
                runs[name]["prefill"].append(prefill)
                runs[name]["decode"].append(decode)
            if bar:
                bar.update()
    finally:
        if bar:
            bar.close()
        for name, m in models.items():
            m.train(was_training[name])
    for r in runs.values():
        r["prefill_median"] = statistics.median(r["prefill"])
        r["decode_median"] = statistics.median(r["decode"])
    return {"reference": runs["reference"], "other": runs["other"],
            "prefill": compare_runs(runs["reference"]["prefill"], runs["other"]["prefill"]),
            "decode": compare_runs(runs["reference"]["decode"], runs["other"]["decode"]),
            "prefill_tokens": prefill_tokens, "decode_tokens": decode_tokens}


def fill_costs(before_cost, after_cost, speed: dict) -> None:
    """Write an :func:`alternating_speed` result into the two results' cost figures."""
    for cost, runs in ((before_cost, speed["reference"]), (after_cost, speed["other"])):
        if cost is None:
            continue
        cost.prefill_tokens_per_s = runs["prefill_median"]
        cost.decode_tokens_per_s = runs["decode_median"]
        cost.peak_memory_bytes = runs["peak_memory_bytes"]
        cost.prefill_tokens, cost.decode_tokens = speed["prefill_tokens"], speed["decode_tokens"]
        cost.speed_runs = {"prefill": runs["prefill"], "decode": runs["decode"], "alternating": True}
    if after_cost is not None:
        after_cost.speed_vs_reference = {"prefill": speed["prefill"], "decode": speed["decode"]}


def describe_ratio(comparison: dict | None) -> str | None:
    """``0.97x, range 0.91-1.02, 7 rounds`` or ``too noisy: 0.55-1.40x over 7 rounds``."""
    if not comparison:
        return None
    lo, hi, n = comparison["low"], comparison["high"], comparison["rounds"]
    if comparison["noisy"]:
        return f"too noisy: {lo:.2f}-{hi:.2f}x over {n} rounds"
    return f"{comparison['ratio']:.2f}x, range {lo:.2f}-{hi:.2f}, {n} rounds"
