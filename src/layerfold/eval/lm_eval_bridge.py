"""Run lm-evaluation-harness on the local task files, as a cross-check of our scorer.

Optional: needs ``pip install "layerfold[lm-eval]"``. Works offline: each local .jsonl task
becomes an lm-eval task config over the ``json`` data set builder with the same prompt
(``TASK_FORMATS``) our scorer uses, so both score exactly the same strings.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from ..errors import LayerfoldError
from .tasks import LANGUAGE_MODELING, TASK_FORMATS, TaskFormat, load_task, resolve_task_path, task_name


def _jinja(template: str) -> str:
    return template.replace("{query}", "{{query}}")


def task_config(name: str, path: Path) -> str:
    """An lm-eval YAML task for one local task file (same prompt as ``load_task``)."""
    fmt = TASK_FORMATS.get(name, TaskFormat())
    kind = load_task(path, limit=1)
    import json

    first = json.loads(Path(path).read_text(encoding="utf-8").splitlines()[0])
    head = [
        f"task: layerfold_{name}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    validation: {json.dumps(str(Path(path).resolve()))}",
        "validation_split: validation",
        f"target_delimiter: {json.dumps(fmt.delimiter)}",
    ]
    if kind.kind == LANGUAGE_MODELING:
        body = ["output_type: loglikelihood", 'doc_to_text: "{{context}}"', 'doc_to_target: "{{continuation}}"',
                "metric_list:", "  - metric: perplexity", "  - metric: acc"]
    elif "context_options" in first:
        # partial scoring: doc_to_text gives the gold index, the choices are the contexts
        body = ["output_type: multiple_choice", 'doc_to_text: "{{gold}}"', 'doc_to_choice: "{{context_options}}"',
                'doc_to_target: "{{continuation}}"', "metric_list:", "  - metric: acc"]
    else:
        body = ["output_type: multiple_choice", f"doc_to_text: {json.dumps(_jinja(fmt.template))}",
                'doc_to_choice: "{{choices}}"', 'doc_to_target: "{{gold}}"',
                "metric_list:", "  - metric: acc", "  - metric: acc_norm"]
    return "\n".join(head + body) + "\n"


def run_lm_eval(loaded, tasks: list[str], *, limit: int | None = None, batch_size: int = 8,
                data_dir: str | os.PathLike | None = None) -> dict[str, dict[str, float]]:
    """lm-eval's metrics for local tasks: ``{task: {"acc": ..., "acc_norm": ...}}``."""
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise LayerfoldError('--lm-eval needs lm-evaluation-harness: pip install "layerfold[lm-eval]"') from None
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    paths = {task_name(p): p for p in (resolve_task_path(t, data_dir) for t in tasks)}
    with tempfile.TemporaryDirectory(prefix="layerfold-lm-eval-") as tmp:
        for name, path in paths.items():
            (Path(tmp) / f"layerfold_{name}.yaml").write_text(task_config(name, path), encoding="utf-8")
        model, tok = (loaded.model, loaded.tokenizer) if hasattr(loaded, "model") else loaded
        lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=str(next(model.parameters()).device))
        out = lm_eval.simple_evaluate(model=lm, tasks=[f"layerfold_{n}" for n in paths],
                                      task_manager=TaskManager(include_path=tmp), limit=limit,
                                      log_samples=False, bootstrap_iters=0)
    results = {}
    for name in paths:
        raw = out["results"][f"layerfold_{name}"]
        results[name] = {k.split(",")[0]: float(v) for k, v in raw.items()
                         if "," in k and "stderr" not in k and isinstance(v, (int, float))}
    return results
