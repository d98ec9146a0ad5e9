"""Evaluation: task accuracy, perplexity, stability, and what a model costs.

    from layerfold.eval import evaluate
    before = evaluate(original, tasks=["piqa", "winogrande"], ppl=["lambada_openai"], limit=200)
    after = evaluate(pruned, tasks=["piqa", "winogrande"], ppl=["lambada_openai"], limit=200,
                     reference=before)
    after.tasks["piqa"].metrics  # {"acc", "acc_norm", "stability", "stability_norm"}
    after.save("after.json")
"""

from .cost import Cost, measure_cost
from .evaluate import evaluate, evaluate_task
from .perplexity import PerplexityResult, perplexity, read_documents
from .result import EvalResult, TaskResult
from .scoring import encode_pair, score_examples, score_examples_naive
from .stability import agreement, confidence_weights, effective_examples, stability
from .tasks import TASK_FORMATS, Task, TaskFormat, data_dir, load_task, resolve_task_path

__all__ = [
    "Cost",
    "EvalResult",
    "PerplexityResult",
    "Task",
    "TaskFormat",
    "TaskResult",
    "TASK_FORMATS",
    "confidence_weights",
    "data_dir",
    "encode_pair",
    "evaluate",
    "evaluate_task",
    "load_task",
    "measure_cost",
    "perplexity",
    "read_documents",
    "resolve_task_path",
    "score_examples",
    "score_examples_naive",
    "stability",
    "agreement",
    "effective_examples",
]
