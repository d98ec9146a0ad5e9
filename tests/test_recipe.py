"""One schema: every option has a flag, a help text and a place in the recorded recipe; YAML
recipes read back to the same options; `layerfold run OUT/recipe.yaml` rebuilds a model bitwise."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from layerfold import schema
from layerfold.cli import build_parser, main
from layerfold.errors import LayerfoldError
from layerfold.recipe import (
    RECIPE_FILE,
    RECIPES,
    AnalyzeOptions,
    CompressOptions,
    EvaluateOptions,
    ExportOptions,
    HealModelOptions,
    from_text,
    read_recipe,
    to_yaml,
)

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread

ROOTS = {"compress": CompressOptions, "heal": HealModelOptions, "analyze": AnalyzeOptions, "eval": EvaluateOptions,
         "export": ExportOptions}


def _other_value(o: schema.Option, value):
    """A valid value different from ``value`` for the option ``o``."""
    if o.choices:
        return next(c for c in o.choices if c != value)
    if o.kind is bool:
        return not value
    if o.kind is int:
        return (value or 0) + 3
    if o.kind is float:
        return 0.375 if value != 0.375 else 0.625  # a fraction, exact in binary and in text
    if o.kind is list:
        return ["alpha", "beta"]
    if o.kind is dict:
        return {"cpu": "3GiB"}
    return "text-x" if value != "text-x" else "text-y"


def _changed(root, o: schema.Option):
    """The command's default options with one option changed (an absent group it needs created)."""
    default = root()
    group = next((g for g in schema.groups(root) if g.path == o.group), None)
    current = default
    if group is not None and group.optional and schema.get(default, group.path) is None:
        current = schema.with_values(default, {group.path: group.cls()})  # differ from the group's own default
    values = {o.path: _other_value(o, schema.get(current, o.path))}
    if group is not None and group.optional and group.requires and o.name != group.requires:
        key = group.path + (group.requires,)
        values[key] = next(x for x in schema.options(root) if x.path == key).choices[0]
    return schema.with_values(default, values)


def _parse(command: str, root):
    import shlex

    args = build_parser().parse_args(shlex.split(command)[1:])
    return schema.from_arguments(root(), args)


@pytest.mark.parametrize("command", list(ROOTS))
def test_every_option_has_a_flag_a_help_text_and_a_place_in_the_recipe(command):
    """For each option, a changed value shows in the recorded command line, and that command line
    parses back to the same options; and (commands with recipes) in recipe.yaml, which reads back
    the same."""
    root = ROOTS[command]
    opts = schema.options(root)
    assert len(opts) >= (100 if command == "compress" else 4)
    flags = [f for o in opts for f in ([o.flag] if o.flag else [])]
    assert len(flags) == len(set(flags)), "two options share a flag"
    for o in opts:
        assert o.help.strip(), f"{o.key} has no help text"
        assert o.flag or o.positional, f"{o.key} has no flag"
        if o.kind is bool and schema._sets(o) == schema.get(root(), o.path):
            continue  # a flag that states its default, kept for old command lines (export --unfold)
        changed = _changed(root, o)
        line = changed.command() if hasattr(changed, "command") else schema.command_line(
            changed, root(), ["layerfold", command])
        if not o.positional:
            assert o.flag in line or any(f in line for f in o.consts), (o.key, line)
        assert _parse(line, root) == changed, (o.key, line)
        if command in RECIPES:
            text = to_yaml(changed)
            assert from_text(text) == changed, o.key
            record = yaml.safe_load(text)
            for part in o.path[:-1]:
                record = record[part]
            assert o.name in record, o.key


def test_compress_help_is_grouped_and_comes_from_the_schema(capsys):
    with pytest.raises(SystemExit):
        main(["compress", "--help"])
    out = capsys.readouterr().out
    for section in ("model:", "data:", "selection:", "repair:", "healing:", "evaluation:", "output:",
                    "foldgpt.gates:", "foldgpt.cure:"):
        assert f"\n{section}\n" in out, section
    for o in schema.options(CompressOptions):
        if o.flag:
            assert o.flag in out, o.flag


def test_the_recipe_file_reads_back_to_the_same_options(tmp_path):
    opts = dataclasses.replace(
        CompressOptions(), healing=dataclasses.replace(CompressOptions().healing, tokens=1234, lr=1e-5))
    path = tmp_path / RECIPE_FILE
    path.write_text(to_yaml(opts))
    assert read_recipe(path) == opts
    text = path.read_text()
    assert "healing:" in text and "tokens: 1234" in text and "# healing token budget" in text
    again = read_recipe(path, ["healing.tokens=65536", "selection.method=last-n", "evaluation.tasks=[piqa, boolq]"])
    assert again.healing.tokens == 65536 and again.selection.method == "last-n"
    assert again.evaluation.tasks == ["piqa", "boolq"] and again.healing.lr == 1e-5


@pytest.mark.parametrize("text, message", [
    ("healing:\n  heal_tokns: 5\n", "unknown key 'heal_tokns' in healing; did you mean 'tokens'?"),
    ("selection:\n  mthod: bi\n", "unknown key 'mthod' in selection; did you mean 'method'?"),
    ("modle:\n  dtype: fp32\n", "unknown key 'modle' in the recipe; did you mean 'model'?"),
    ("healing:\n  train: lorax\n", "bad value for healing.train: 'lorax' (allowed: one of lora, layers, lora+layers)"),
    ("healing:\n  tokens: many\n", "bad value for healing.tokens: 'many' (allowed: an integer)"),
    ("layer_pass:\n  max_memory: lots\n",
     "bad value for layer_pass.max_memory: 'lots' (allowed: a memory size like 512MiB or 2GB)"),
    ("healing: 5\n", "healing must be a mapping of keys to values (got 5)"),
])
def test_recipe_errors_name_the_key_the_value_and_what_is_allowed(tmp_path, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(LayerfoldError) as e:
        read_recipe(path)
    assert str(e.value) == message


def test_set_overrides_are_checked_too(tmp_path, capsys):
    path = tmp_path / "r.yaml"
    path.write_text("selection:\n  method: bi\n")
    code = main(["-q", "run", str(path), "--set", "healing.tokns=3"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err == "layerfold: error: unknown key 'tokns' in healing; did you mean 'tokens'?"


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("flags", [
    ["--method", "bi", "--heal-tokens", "256", "--heal-data", "{text}", "--heal-seq-len", "32",
     "--heal-batch-size", "4", "--lora-rank", "2"],
    ["--method", "streamline", "--train-tokens", "64", "--pair-dtype", "fp32", "--no-heal"],
])
def test_run_the_recorded_recipe_rebuilds_the_model_bitwise(capsys, tiny_model_dir, text_file, tmp_path, flags):
    first, second = tmp_path / "first", tmp_path / "second"
    argv = ["-q", "compress", tiny_model_dir("llama"), "--remove", "2", "--calib", text_file, "--calib-samples", "6",
            "--seq-len", "16", "--no-eval", "-o", str(first), *[f.replace("{text}", text_file) for f in flags]]
    assert main(argv) == 0, capsys.readouterr()
    recipe = first / RECIPE_FILE
    assert recipe.is_file()
    assert main(["-q", "run", str(recipe), "-o", str(second)]) == 0, capsys.readouterr()
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the second folder's recipe differs from the first only in where it was written
    one, two = yaml.safe_load(recipe.read_text()), yaml.safe_load((second / RECIPE_FILE).read_text())
    assert one.pop("output") != two.pop("output") and one == two
    record = json.loads((second / "layerfold.json").read_text())
    assert record["command"].startswith("layerfold compress ")


def test_a_healed_folder_holds_the_heal_recipe_and_run_repeats_it(capsys, tiny_model_dir, text_file, tmp_path):
    pruned, healed, again = tmp_path / "pruned", tmp_path / "healed", tmp_path / "again"
    assert main(["-q", "compress", tiny_model_dir("llama"), "--method", "last-n", "--remove", "2", "--no-heal",
                 "--no-eval", "-o", str(pruned)]) == 0
    assert main(["-q", "heal", str(pruned), "--teacher", tiny_model_dir("llama"), "-o", str(healed),
                 "--heal-tokens", "128", "--heal-data", text_file, "--heal-seq-len", "32", "--heal-batch-size", "4",
                 "--lora-rank", "2"]) == 0, capsys.readouterr()
    recipe = yaml.safe_load((healed / RECIPE_FILE).read_text())
    assert recipe["command"] == "heal" and recipe["healing"]["tokens"] == 128
    assert main(["-q", "run", str(healed / RECIPE_FILE), "-o", str(again)]) == 0, capsys.readouterr()
    a, b = _weights(healed), _weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((again / "layerfold.json").read_text())
    assert record["layer_map"] == [0, 1, 2, 3] and record["layers_before"] == 6


@dataclasses.dataclass
class _Gates:
    gate_type: str = dataclasses.field(default="hard", metadata={"help": "the kind", "choices": ("hard", "soft")})
    steps: int = dataclasses.field(default=5, metadata={"help": "how long"})
    shiny: bool = dataclasses.field(default=False, metadata={"help": "a new switch"})
    budget: float = 1.0  # no help of its own: the group's fallback supplies it


@dataclasses.dataclass
class _Root:
    gates: _Gates | None = dataclasses.field(default=None, metadata={
        "help": "gates", "prefix": "gate-", "switch": "--gates", "helps": {"budget": "fallback help"}})
    name: str = dataclasses.field(default="x", metadata={"help": "a name", "flag": "--name"})


def test_a_new_field_joins_the_schema_with_its_own_flag_and_help():
    """What another module adds to its options dataclass appears in the parser, the recipe and
    the recorded command with no edit here: a GateOptions-like group gets --gate-<name>."""
    import argparse

    Root, Gates = _Root, _Gates
    opts = {o.key: o for o in schema.options(Root)}
    assert [o.flag for o in opts.values()] == ["--gate-type", "--gate-steps", "--gate-shiny", "--gate-budget", "--name"]
    assert opts["gates.budget"].help == "fallback help" and opts["gates.steps"].help == "how long"
    parser = argparse.ArgumentParser()
    schema.add_arguments(parser, Root())
    wanted = Root(gates=Gates(gate_type="soft", shiny=True))
    line = schema.command_line(wanted, Root(), ["x"])
    assert line == "x --gates --gate-type soft --gate-shiny"
    import shlex

    assert schema.from_arguments(Root(), parser.parse_args(shlex.split(line)[1:])) == wanted
    assert schema.from_arguments(Root(), parser.parse_args([])) == Root()
    with pytest.raises(LayerfoldError, match="--gate-steps need --gates"):
        schema.from_arguments(Root(), parser.parse_args(["--gate-steps", "3"]))
    assert schema.from_dict(Root(), {"gates": {"steps": 9}}) == Root(gates=Gates(steps=9))
