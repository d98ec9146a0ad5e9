"""mergekit slices: the same layer removal as a mergekit ``passthrough`` recipe.

mergekit's ``layer_range: [a, b]`` is half-open, like Python's ``range(a, b)``: it takes layers
a .. b-1 (mergekit #360 is users taking it for inclusive). A removal becomes one slice per run of
consecutive kept layers. ``mergekit-yaml mergekit.yaml OUT`` run on the original then gives the
pruned model's tensors bit for bit before any healing (benchmarks/interop.md checks it).

Only a pure removal has a mergekit form: a trained replacement layer or shared weights do not.
"""

from __future__ import annotations

from ..errors import LayerfoldError
from ..models.layer_map import LayerMap

MERGEKIT_FILE = "mergekit.yaml"


def is_pure_removal(layer_map: LayerMap, groups: list[list[int]] | None = None) -> bool:
    """Every layer is an original one, in the original order, and no weights are shared."""
    src = layer_map.sources
    if any(s is None for s in src) or any(b <= a for a, b in zip(src, src[1:])):
        return False
    return not groups or all(len(g) == 1 for g in groups)


def slices(layer_map: LayerMap) -> list[tuple[int, int]]:
    """Runs of consecutive kept layers as half-open ``(start, end)`` ranges of original indices."""
    if not is_pure_removal(layer_map):
        raise LayerfoldError("only a pure layer removal has mergekit slices")
    runs: list[list[int]] = []
    for s in layer_map.sources:
        if runs and s == runs[-1][1]:
            runs[-1][1] = s + 1
        else:
            runs.append([s, s + 1])
    return [(a, b) for a, b in runs]


def mergekit_yaml(model: str, layer_map: LayerMap, dtype: str = "float32", *, healed: bool = False,
                  note: str | None = None) -> str:
    """The text of ``mergekit.yaml`` for a removal from ``model`` (a folder or hub id)."""
    import yaml

    removed = sorted(set(range(layer_map.layers_before)) - set(layer_map.sources))
    header = [
        "mergekit passthrough recipe written by layerfold: the same layers as this model, taken from the",
        f"original ({len(layer_map.sources)} of {layer_map.layers_before}; removed {', '.join(map(str, removed)) or 'none'}).",
        "layer_range is half-open: [a, b] takes layers a .. b-1.",
        "Run:  mergekit-yaml mergekit.yaml OUT",
        "It rebuilds the model before healing" + (" (this model was healed afterwards, so its weights differ)."
                                                 if healed else " (this model was not healed: the same tensors)."),
    ]
    if note:
        header.append(note)
    body = {
        "slices": [{"sources": [{"model": model, "layer_range": [a, b]}]} for a, b in slices(layer_map)],
        "merge_method": "passthrough",
        "dtype": dtype,
    }
    return "".join(f"# {line}\n" for line in header) + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def dtype_name(torch_dtype) -> str:
    import torch

    return {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}.get(torch_dtype, "float32")
