"""layerfold: make decoder-only language models shallower.

The pipeline: load -> measure importance -> transform (prune, replace, share) -> heal ->
evaluate -> save. The command line is a thin layer over these functions.
"""

from ._version import __version__
from .errors import LayerfoldError  # noqa: E402
from .models.loading import load_model  # noqa: E402
from .pipeline import AnalyzeOptions, CompressOptions, EvalOptions, analyze, compress  # noqa: E402
from .eval import EvalResult, evaluate  # noqa: E402

__all__ = [
    "LayerfoldError",
    "load_model",
    "analyze",
    "compress",
    "AnalyzeOptions",
    "CompressOptions",
    "EvalOptions",
    "evaluate",
    "EvalResult",
    "__version__",
]
