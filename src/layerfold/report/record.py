"""What an output folder says about the run that made it: ``layerfold.json`` and the card's prose.

``layerfold.json`` keeps, beside the full options (``options``, the same as ``recipe.yaml``)
and the plan (``plan``), a ``recipe`` of what was done in the shape the report and earlier
outputs use: the layers removed, the replacement, the groups, the healing recipe.
"""

from __future__ import annotations

import resource

from .._version import __version__


def heal_sentence(summary: dict) -> str:
    return (f"healed on {summary['tokens']:,} tokens ({summary['trainable']}; "
            f"{summary['trainable_parameters']:,} trainable parameters) with the original model as teacher.")


def evaluation_table(before, after, limit: int | None) -> str:
    """Accuracy before and after, and stability against the original, as a Markdown table."""
    rows = ["| task | original acc | compressed acc | stability (on ~n examples) | agreement |", "|---|---:|---:|---:|---:|"]
    for name, task in after.tasks.items():
        o, c = before.tasks[name].metrics, task.metrics
        if "acc" in o and "stability" in c:
            n_eff = f" (~{c['stability_examples']:.1f})" if "stability_examples" in c else ""
            agree = f"{c['agreement']:.3f}" if "agreement" in c else "-"
            rows.append(f"| {name} | {o['acc']:.3f} | {c['acc']:.3f} | {c['stability']:.3f}{n_eff} | {agree} |")
    text = []
    h = after.heldout
    if h:
        text.append(f"On {h['rows']} held-out rows of calibration-style text (never used for selection or healing): "
                    f"KL to the original {h['kl']:.3f} per token, top-1 agreement {100 * h['top1']:.1f}%, "
                    f"perplexity {h['reference_ppl']:.2f} (original) -> {h['ppl']:.2f}.")
    if len(rows) > 2:
        scope = f"first {limit} examples of each task" if limit else "all examples"
        text.append(f"Evaluation ({scope}; stability as in LLM-Streamline: confidence-weighted agreement "
                    "with the original on which answers are right; `eval_after.json` has everything):\n\n"
                    + "\n".join(rows))
    return "\n\n".join(text)


def streamline_record(so, sl) -> dict:
    """The trained replacement: block, sizes, training text, batch, steps and validation curve."""
    fit = sl.fit
    return {
        "replacement": so.replacement,
        "loss": so.loss,
        "init": so.init if so.replacement in ("layer", "swiglu") else None,
        "ffn_width": so.ffn_width,
        "ffn_activation": so.ffn_activation if so.replacement == "ffn" else None,
        "block_start": sl.start,
        "block_layers": sl.window,
        "block_cosine": sl.block_cosine,
        "replacement_parameters": sl.replacement_params,
        "pair_tokens": sl.pair_tokens,
        "pair_bytes": sl.pair_bytes,
        "pair_dtype": so.pair_dtype if sl.pair_tokens else None,
        "train": {"data": {k: getattr(so.data, k) for k in ("source", "seq_len", "seed")},
                  **{k: getattr(so, k) for k in ("lr", "min_lr", "weight_decay", "warmup", "grad_clip", "epochs",
                                                 "train_tokens", "batch", "min_steps", "batch_size", "val_rows",
                                                 "precision", "seed")}, "betas": [0.9, 0.95]},
        # what the run did: rows, batch (micro x accumulation), steps, tokens, the validation curve
        "training": dict(sl.training),
        "steps": fit.steps if fit else 0,
        "first_val_loss": fit.first_val if fit else None,
        "best_val_loss": fit.best_val if fit else None,
        "best_step": fit.best_step if fit else None,
        "train_seconds": fit.seconds if fit else 0.0,
    }


def streamline_summary(so, sl, n_layers: int) -> str:
    block = f"layers {sl.start}..{sl.start + sl.window - 1}"
    cosine = f", cosine {sl.block_cosine:.4f}" if sl.block_cosine is not None else ""
    if so.replacement == "none":
        return (f"LLM-Streamline block choice without training: of the most redundant block ({block}{cosine}) "
                f"only the first layer is kept; {len(sl.removed)} of {n_layers} layers removed.")
    fit, t = sl.fit, sl.training
    if fit and t:
        curve = ", ".join(f"{v['loss']:.4g}@{v['step']}" for v in t.get("validation", []))
        trained = (f"{t['steps']} steps of {t['batch']} sequences ({t['micro_batch']} x {t['grad_accum']} accumulated) "
                   f"over {t['train_tokens']:,} tokens of '{t['source']}' text ({t['tokens_seen']:,} seen); "
                   f"validation {so.loss} loss on {t['val_rows']} held-out sequences {fit.first_val:.4g} -> "
                   f"{fit.best_val:.4g} (best at step {fit.best_step}; curve {curve})")
    else:
        trained = "untrained"
    init = f", initialised from the block's {so.init} layer" if so.replacement in ("layer", "swiglu") else ""
    return (f"LLM-Streamline: the most redundant block ({block}{cosine}) was replaced "
            f"by one trained `{so.replacement}` replacement ({so.loss} loss{init}; {trained}); "
            f"{len(sl.removed)} of {n_layers} layers removed net. Training log: `training_log.jsonl`.")


def foldgpt_summary(plan, cure_steps: int) -> str:
    shared = [g for g in plan.groups if len(g) > 1]
    return (
        f"FoldGPT: removed {len(plan.removed)} of {plan.layers_before} decoder layers by "
        f"{'learned gates' if plan.selection == 'gates' else 'the ' + plan.selection + ' selection'}, then "
        f"{sum(len(g) for g in shared)} of the remaining {plan.layers_after} layers share their linear weights in "
        f"groups ({', '.join(f'{g[0]}-{g[-1]}' for g in shared) or 'none'}); "
        + (f"cured for {cure_steps} steps with logit KL + tail-layer distillation." if cure_steps > 0 else "no cure.")
        + " Shared tensors are stored once: load with layerfold, or with "
        "`AutoModelForCausalLM.from_pretrained(PATH, trust_remote_code=True)`; "
        "`layerfold export PATH --unfold -o OUT` writes a standard model."
    )


# what a clock or a memory meter measured, and how the process went (the step a resumed run
# restarted at): it differs between runs of the same inputs, so a reproducible folder
# (--reproducible) leaves it out (keys ending in "_seconds" too)
MEASURED = frozenset({"seconds", "peak_rss_mib", "tokens_per_second", "peak_memory_bytes", "prefill_tokens_per_s",
                      "decode_tokens_per_s", "resumed_from", "budget_bytes", "budget_source"})


def is_measured(key) -> bool:
    return isinstance(key, str) and (key in MEASURED or key.endswith("_seconds"))


def without_measurements(value):
    """``value`` (a record of dicts, lists and numbers) without any measured entry, at any depth."""
    if isinstance(value, dict):
        return {k: without_measurements(v) for k, v in value.items() if not is_measured(k)}
    if isinstance(value, (list, tuple)):
        return [without_measurements(v) for v in value]
    return value


def environment(opts) -> dict:
    """The library versions and the seeds behind a folder: what the same bytes again need."""
    from ..recipe import seeds, versions

    return {"versions": versions(), "seeds": seeds(opts)}


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def version() -> str:
    return __version__
