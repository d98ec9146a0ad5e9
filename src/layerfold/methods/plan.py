"""What a compression will do, decided before any weight changes: the selection options and the plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..schema import parse_fraction

METHODS = ("streamline", "streamline-block", "bi", "angular", "last-n", "foldgpt")
DEFAULT_METHOD = "bi"  # best measured on the embedded model (benchmarks/healing.md)


@dataclass
class SelectionOptions:
    """Which layers go, and how many."""

    method: str = field(default=DEFAULT_METHOD, metadata={
        "help": "how to choose the layers and what stands in for them (see the methods above)", "choices": METHODS,
        "flag": "--method"})
    remove: int | None = field(default=None, metadata={
        "help": "number of layers to remove (default: 25% of them)", "flag": "--remove"})
    sparsity: float | None = field(default=None, metadata={
        "help": "fraction of decoder-layer parameters to remove, e.g. 0.25 or 25%", "flag": "--sparsity",
        "parse": parse_fraction, "allowed": "a fraction like 0.25 or 25%"})
