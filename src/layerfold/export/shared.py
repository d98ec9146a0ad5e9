"""How a model whose layers share weights (FoldGPT) is stored, and read back.

safetensors cannot alias tensors, so a shared model is saved with each shared tensor once,
under the name of the group's first layer, and ``config.json`` lists the other names in
``layerfold_shared`` (target name -> stored name). Two loaders understand it:

- layerfold's loader (``load_model``), which builds the base architecture and ties the
  listed parameters after loading; no custom code runs;
- ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, through a
  ten-line ``modeling_layerfold_shared.py`` shipped in the folder and registered in
  ``auto_map``: it subclasses the base class and adds the listed names to transformers'
  own tied-weights mapping (``get_expanded_tied_weights_keys``), so transformers ties them
  exactly as it ties embeddings and lm_head.

The config's ``model_type`` is ``layerfold_shared`` (the base type is kept in
``layerfold_base_model_type``). That is deliberate: with the base type, stock transformers
without ``trust_remote_code`` would silently fall back to its own class and fill the missing
shared tensors with random numbers; with an unknown type it refuses with a clear message.
``layerfold.export.unfold`` writes a standard model with every shared tensor materialised.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from torch import nn

from ..errors import LayerfoldError
from ..models.architectures import Architecture
from ..models.saving import save_model_folder
from ..models.surgery import decoder_layers
from ..nn.shared import attach_deltas, delta_ranks, shared_parameter_map

SHARED_MODEL_TYPE = "layerfold_shared"
MODELING_FILE = "modeling_layerfold_shared.py"

_MODELING_TEMPLATE = '''"""Weight sharing across decoder layers, written by layerfold.

Some parameters of this model are stored once and used by several layers: config.json's
``layerfold_shared`` maps each such name to the stored one. This class adds that map to
transformers' tied-weights mechanism, so loading ties them like embeddings and lm_head.
Linear layers named in ``layerfold_deltas`` (name -> rank) add their own low-rank delta
B A to the shared weight: W x + B (A x).
"""

import torch
from transformers import {config_class} as _BaseConfig
from transformers import {model_class} as _BaseModel


class LayerfoldSharedConfig(_BaseConfig):
    model_type = "{model_type}"


class _DeltaLinear(torch.nn.Module):
    def __init__(self, base, rank):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight, self.bias = base.weight, base.bias
        rank = min(rank, self.in_features, self.out_features)
        self.delta_b = torch.nn.Parameter(torch.zeros(self.out_features, rank, dtype=base.weight.dtype))
        self.delta_a = torch.nn.Parameter(torch.zeros(rank, self.in_features, dtype=base.weight.dtype))

    def forward(self, x):
        f = torch.nn.functional.linear
        return f(x, self.weight, self.bias) + f(f(x, self.delta_a), self.delta_b)


class LayerfoldSharedForCausalLM(_BaseModel):
    config_class = LayerfoldSharedConfig

    def __init__(self, config):
        super().__init__(config)
        for name, rank in (getattr(config, "layerfold_deltas", None) or {{}}).items():
            parent, _, child = name.rpartition(".")
            owner = self.get_submodule(parent)
            setattr(owner, child, _DeltaLinear(getattr(owner, child), rank))

    def get_expanded_tied_weights_keys(self, all_submodels=False):
        keys = super().get_expanded_tied_weights_keys(all_submodels=all_submodels)
        keys.update(getattr(self.config, "layerfold_shared", None) or {{}})
        return keys
'''


def modeling_file(model: nn.Module) -> str:
    return _MODELING_TEMPLATE.format(
        config_class=type(model.config).__name__,
        model_class=type(model).__name__,
        model_type=SHARED_MODEL_TYPE,
    )


def deduplicated_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with each shared storage once, under its first name."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def shared_config_json(model: nn.Module, mapping: dict[str, str], groups: list[list[int]]) -> str:
    """config.json of a shared model: the base config plus the sharing map and auto_map."""
    d = model.config.to_dict()
    base_type = d["model_type"]
    deltas = delta_ranks(model)
    if deltas:
        d["layerfold_deltas"] = deltas
    d.update(
        model_type=SHARED_MODEL_TYPE,
        layerfold_base_model_type=base_type,
        layerfold_shared=mapping,
        layerfold_groups=groups,
        architectures=["LayerfoldSharedForCausalLM"],
        auto_map={
            "AutoConfig": f"{MODELING_FILE[:-3]}.LayerfoldSharedConfig",
            "AutoModelForCausalLM": f"{MODELING_FILE[:-3]}.LayerfoldSharedForCausalLM",
        },
    )
    return json.dumps(d, indent=2, sort_keys=True, default=str) + "\n"


def read_shared_config(folder: Path) -> dict | None:
    """The config.json of a layerfold shared model folder, or None for any other folder."""
    path = Path(folder) / "config.json"
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return d if d.get("model_type") == SHARED_MODEL_TYPE else None


def base_config(shared: dict):
    """The base architecture's config object for a shared folder's config.json."""
    from transformers import AutoConfig

    d = dict(shared)
    base_type = d.pop("layerfold_base_model_type", None)
    if not base_type:
        raise LayerfoldError("shared model config has no layerfold_base_model_type")
    for key in ("model_type", "auto_map", "architectures", "layerfold_groups", "layerfold_deltas"):
        d.pop(key, None)
    mapping = d.pop("layerfold_shared", {}) or {}
    try:
        cfg = AutoConfig.for_model(base_type, **d)
    except ValueError as e:
        raise LayerfoldError(f"shared model of unknown base type {base_type!r}: {e}") from None
    return cfg, mapping


def load_deltas(model: nn.Module, folder: Path, ranks: dict[str, int]) -> None:
    """Rebuild the per-layer delta modules ``ranks`` names and fill them from the folder's
    safetensors files (transformers' base class does not know these tensors)."""
    from safetensors import safe_open

    if not ranks:
        return
    attach_deltas(model, ranks)
    wanted = {f"{name}.{part}" for name in ranks for part in ("delta_a", "delta_b")}
    params = dict(model.named_parameters())
    found = set()
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in wanted.intersection(f.keys()):
                target = params[key]
                value = f.get_tensor(key)
                if value.shape != target.shape:
                    raise LayerfoldError(f"stored delta {key} has shape {tuple(value.shape)}, expected {tuple(target.shape)}")
                with torch.no_grad():
                    target.copy_(value.to(target.dtype))
                found.add(key)
    if found != wanted:
        raise LayerfoldError(f"{folder}: the config names deltas the files do not hold ({sorted(wanted - found)[0]}, ...)")


def save_shared_folder(loaded, out: Path, *, card: str, extra_files: dict | None = None,
                       force: bool = False, finish=None) -> Path:
    """Save a model whose layers share weights, each shared tensor once (see module doc).

    A model without shared layers is saved as a standard folder.
    """
    model = loaded.model
    exclude = set(getattr(model, "all_tied_weights_keys", {}) or {})  # lm_head <- embeddings
    mapping = shared_parameter_map(model, exclude=exclude)
    if not mapping:
        return save_model_folder(loaded, out, card=card, extra_files=extra_files, force=force, finish=finish)
    groups = _groups_from_map(mapping, len(decoder_layers(model, loaded.arch)), loaded.arch)
    files = {
        "config.json": shared_config_json(model, mapping, groups),
        MODELING_FILE: modeling_file(model),
        **(extra_files or {}),
    }
    return save_model_folder(loaded, out, card=card, extra_files=files, force=force,
                             state_dict=deduplicated_state_dict(model), finish=finish)


def _groups_from_map(mapping: dict[str, str], num_layers: int, arch: Architecture) -> list[list[int]]:
    owner = list(range(num_layers))
    prefix = re.escape(arch.layers) + r"\.(\d+)\."
    for target, source in mapping.items():
        t, s = re.match(prefix, target), re.match(prefix, source)
        if t and s:
            owner[int(t[1])] = int(s[1])
    groups: dict[int, list[int]] = {}
    for l, o in enumerate(owner):
        groups.setdefault(o, []).append(l)
    return sorted(groups.values())
