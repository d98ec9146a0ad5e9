"""The model card written into every output folder."""

from __future__ import annotations

import json

from .._version import __version__


def _environment_lines(environment: dict | None) -> list[str]:
    if not environment:
        return []
    versions = ", ".join(f"{k} {v}" for k, v in environment["versions"].items())
    seeds = ", ".join(f"{k} {v}" for k, v in environment["seeds"].items()) or "none"
    return [f"Versions: {versions}. Seeds: {seeds}.", ""]


def model_card(
    *,
    base_model: str,
    command: str,
    recipe: dict,
    layer_map: list[int | None],
    params_before: int,
    params_after: int,
    layers_before: int,
    summary: str = "",
    recipe_yaml: str | None = None,
    outputs: list[str] | None = None,
    environment: dict | None = None,
) -> str:
    """The model card: what was done, the command and the recipe that do it again, the layer map.

    ``recipe`` is what was done (layers removed, replacements, groups...); ``recipe_yaml`` the
    options that made it (``recipe.yaml``), when the model came from a recipe; ``outputs`` the
    files written and the tools each was checked with; ``environment`` the library versions and
    seeds (``report.record.environment``).
    """
    removed = sorted(set(range(layers_before)) - {i for i in layer_map if i is not None})
    rows = "\n".join(
        f"| {new} | {'replacement' if old is None else old} |" for new, old in enumerate(layer_map)
    )
    hub_base = base_model if "/" in base_model and not base_model.startswith(("/", ".")) else None
    front = ["---", "library_name: transformers", "tags:", "- layerfold", "- layer-pruning"]
    if hub_base:
        front += [f"base_model: {hub_base}"]
    front += ["---"]
    pct = 100.0 * (1 - params_after / params_before) if params_before else 0.0
    return "\n".join(
        front
        + [
            "",
            f"# {recipe.get('method', 'compressed')} model from {base_model}",
            "",
            f"Made by layerfold {__version__} from `{base_model}`.",
            "",
            *_environment_lines(environment),
            summary,
            "",
            "| | before | after |",
            "|---|---:|---:|",
            f"| decoder layers | {layers_before} | {len(layer_map)} |",
            f"| parameters | {params_before:,} | {params_after:,} ({pct:.1f}% fewer) |",
            "",
            f"Removed layers (original indices): {', '.join(map(str, removed)) or 'none'}.",
            "",
            "## Command",
            "",
            "```",
            command,
            "```",
            "",
            *(["## Recipe", "",
               "`layerfold run recipe.yaml -o OUT` builds this model again (the file is in this folder):", "",
               "```yaml", recipe_yaml.rstrip("\n"), "```", ""] if recipe_yaml else []),
            *(["## Outputs and how each was checked", "", *[f"- {line}" for line in outputs], ""]
              if outputs else []),
            "## What was done",
            "",
            "```json",
            json.dumps(recipe, indent=2, default=str),
            "```",
            "",
            "## Layer map (new -> original)",
            "",
            "| new layer | original layer |",
            "|---:|---:|",
            rows,
            "",
            "Load it with stock transformers:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            "model = AutoModelForCausalLM.from_pretrained('PATH')",
            "tokenizer = AutoTokenizer.from_pretrained('PATH')",
            "```",
            "",
        ]
    )
