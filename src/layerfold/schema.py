"""Options declared once: a tree of dataclasses becomes a parser, a YAML recipe and a command line.

Every option is a dataclass field whose ``metadata`` says what it is:

    tokens: int = field(default=0, metadata={"help": "healing token budget; 0: no healing"})

- ``help``: one sentence (required; ``--help``, the YAML recipe and the error messages use it);
- ``path``: a file or folder; the recorded recipe holds it absolute, so it works from anywhere;
- ``choices``: the allowed values;
- ``flag``: the command-line flag (default: ``--`` + the group's ``prefix`` + the name, dashed);
- ``aliases``: more flags for it, registered where no other option of the command owns them;
- ``parse``: a function from text to the value (sizes, fractions), for flags and YAML strings;
  ``allowed`` says in words what it accepts;
- ``consts``: extra flags that set a fixed value, ``{"--no-heal": (0, "help")}``;
- ``repeat``: a list option given as one flag per item; ``metavar``: how ``--help`` names the value;
- ``positional``: the command's positional argument;
- ``schema: False``: not an option (how a run shows itself, e.g. progress bars).

A field whose type is a dataclass is a group: its own metadata gives ``help`` (the group's
description), ``prefix`` (for derived flags), ``flags``, ``helps`` and ``aliases`` (flag names, help texts and more
flags by field name, for a class used in several places or owned by another module),
``exclude`` (fields that do not apply here). A group that may be absent (``X | None``) is switched on by ``switch`` (a flag
that creates it with its defaults) or by ``requires`` (the field whose flag creates it; its
other flags need that one).

Each command's options are one root dataclass instance; its values are the defaults the
command shows and records.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import shlex
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import LayerfoldError


# -- the tree ----------------------------------------------------------------------------


@dataclass
class Option:
    """One leaf of the tree: a field of a group, where it is, and how it is written."""

    path: tuple[str, ...]  # ("healing", "tokens")
    name: str
    kind: type  # int, float, str, bool, list, dict
    optional: bool  # None is a value
    help: str
    flag: str | None
    aliases: tuple[str, ...]
    choices: tuple | None
    parse: Callable[[str], Any] | None
    allowed: str | None
    consts: dict
    positional: bool
    group: tuple[str, ...]  # path of the group it belongs to
    is_path: bool = False  # a file or folder (recorded absolute)
    sets: bool | None = None  # what a bool flag sets (default: False for --no-... flags, else True)
    repeat: bool = False  # a list flag given once per item
    show: Callable[[Any], str] | None = None  # how --help shows the default
    metavar: str | None = None  # how --help names the value

    @property
    def key(self) -> str:
        return ".".join(self.path)

    def what(self) -> str:
        """What the option accepts, in words."""
        if self.choices:
            text = "one of " + ", ".join(map(str, self.choices))
        elif self.allowed:
            text = self.allowed
        else:
            text = {int: "an integer", float: "a number", bool: "true or false", str: "text",
                    list: "a list (or comma-separated text)", dict: "a mapping"}[self.kind]
        return text + (" or null" if self.optional else "")


@dataclass
class Group:
    path: tuple[str, ...]
    cls: type
    help: str
    optional: bool  # the group itself may be None
    switch: str | None  # a flag that creates it with defaults
    requires: str | None  # the field whose value creates it


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _unwrap(tp) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return (args[0] if len(args) == 1 else typing.Union[tuple(args)]), len(args) < len(typing.get_args(tp))
    return tp, False


def _kind(tp) -> type:
    origin = typing.get_origin(tp) or tp
    if origin in (list, tuple, Sequence):
        return list
    if origin is dict:
        return dict
    if origin in (int, float, str, bool):
        return origin
    raise TypeError(f"unsupported option type {tp!r}")


def walk(cls: type, path: tuple[str, ...] = (), context: dict | None = None) -> Iterator[Option | Group]:
    """Every group and option below ``cls``, in declaration order (groups before their fields)."""
    context = context or {}
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("schema", True) is False or f.name in context.get("exclude", ()):
            continue
        tp, optional = _unwrap(hints[f.name])
        if dataclasses.is_dataclass(tp):
            sub = path + (f.name,)
            yield Group(sub, tp, meta.get("help", ""), optional, meta.get("switch"), meta.get("requires"))
            yield from walk(tp, sub, dict(meta))
            continue
        prefix = context.get("prefix", "")
        flag = context.get("flags", {}).get(f.name) or meta.get("flag")
        if flag is None and not meta.get("positional"):
            named = f.name if f.name.startswith(prefix.replace("-", "_")) else prefix + f.name  # gate_type: --gate-type
            flag = "--" + named.replace("_", "-")
        yield Option(
            path=path + (f.name,), name=f.name, kind=_kind(tp), optional=optional,
            help=context.get("helps", {}).get(f.name) or meta.get("help", ""), flag=flag,
            aliases=tuple(meta.get("aliases", ())) + tuple(context.get("aliases", {}).get(f.name, ())),
            choices=tuple(meta["choices"]) if "choices" in meta else None,
            parse=meta.get("parse"), allowed=meta.get("allowed"), consts=dict(meta.get("consts", {})),
            positional=bool(meta.get("positional")), group=path, is_path=bool(meta.get("path")),
            sets=meta.get("sets"), repeat=bool(meta.get("repeat")), show=meta.get("show"),
            metavar=meta.get("metavar"),
        )


def options(cls: type) -> list[Option]:
    return [x for x in walk(cls) if isinstance(x, Option)]


def groups(cls: type) -> list[Group]:
    return [x for x in walk(cls) if isinstance(x, Group)]


def get(obj, path: tuple[str, ...]):
    for part in path:
        if obj is None:
            return None
        obj = getattr(obj, part)
    return obj


def with_values(obj, values: dict[tuple[str, ...], Any]):
    """A copy of the dataclass tree ``obj`` with the values at ``values``' paths replaced.

    An absent optional group that a value needs is created with its defaults.
    """
    if not values:
        return obj
    hints = _hints(type(obj))
    changes = {}
    for f in dataclasses.fields(obj):
        mine = {path[1:]: v for path, v in values.items() if path[0] == f.name}
        if not mine:
            continue
        if () in mine:
            changes[f.name] = mine[()]
            continue
        current = getattr(obj, f.name)
        if current is None:
            current = _unwrap(hints[f.name])[0]()
        changes[f.name] = with_values(current, mine)
    return dataclasses.replace(obj, **changes)


# -- values ------------------------------------------------------------------------------


def convert(option: Option, value):
    """``value`` (read from YAML) as the option's type; a ``LayerfoldError`` that names the key,
    the value and what is allowed otherwise. Text is read with the option's ``parse``, or as a
    number where one is expected (PyYAML reads 1e-5 as text)."""

    def bad():
        return LayerfoldError(f"bad value for {option.key}: {value!r} (allowed: {option.what()})")

    if value is None:
        if option.optional:
            return None
        raise bad()
    if option.parse is not None and isinstance(value, str):
        try:
            value = option.parse(value)
        except (ValueError, TypeError, LayerfoldError, argparse.ArgumentTypeError):
            raise bad() from None
    elif option.kind is bool:
        if not isinstance(value, bool):
            raise bad()
    elif option.kind is int:
        if isinstance(value, str):
            try:
                value = int(value.strip())
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            else:
                raise bad()
    elif option.kind is float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise bad() from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad()
        value = float(value)
    elif option.kind is str:
        if isinstance(value, (dict, list)):
            raise bad()
        value = str(value)
    elif option.kind is list:
        if isinstance(value, str):
            value = [x.strip() for x in value.split(",") if x.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad()
        value = [str(x) for x in value]
    elif option.kind is dict:
        if not isinstance(value, dict):
            raise bad()
        value = {int(k) if str(k).isdigit() else k: v for k, v in value.items()}  # device indices
    if option.choices and value not in option.choices:
        raise bad()
    return value


def _scalar(value) -> str:
    """A value as YAML that reads back as the same value (JSON scalars, floats with a dot)."""
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return ".nan" if math.isnan(value) else (".inf" if value > 0 else "-.inf")
        text = repr(value)
        mantissa, e, exponent = text.partition("e")
        if e and "." not in mantissa:  # PyYAML reads 1e-05 as text; 1.0e-05 as a number
            text = f"{mantissa}.0e{exponent if exponent[0] in '+-' else '+' + exponent}"
        return text
    if isinstance(value, dict):
        return json.dumps({str(k): v for k, v in value.items()})
    if isinstance(value, str) and _plain(value):
        return value
    return json.dumps(value)


def _plain(text: str) -> bool:
    """Whether YAML reads ``text`` unquoted as that very text."""
    import yaml

    if not text or text != text.strip() or any(c in text for c in ":#{}[],&*!|>'\"%@`"):
        return False
    try:
        return yaml.safe_load(text) == text
    except yaml.YAMLError:
        return False


def _short(text: str, width: int = 72) -> str:
    """A help text cut to one short comment (``--help`` has all of it)."""
    if len(text) <= width:
        return text
    return text[: text.rfind(" ", 0, width - 3)].rstrip(",;:") + " ..."


def _flag_value(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def parse_size(text: str) -> int:
    """'512MiB', '2GB', '1.5g', '4096' -> bytes: accelerate's reading of sizes
    (``convert_file_size_to_int``), after normalising the spelling it is strict about (a bare
    number is bytes; k/m/g/t mean KB/MB/GB/TB; a lowercase b would be read as bits)."""
    import re

    from accelerate.utils import convert_file_size_to_int

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([kmgt])(i?)b?)?\s*", str(text), flags=re.I)
    if not m or float(m.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"not a memory size: {text!r} (examples: 512MiB, 2GB)")
    number, prefix, binary = m.group(1), (m.group(2) or "").upper(), m.group(3)
    if not prefix:
        return int(float(number))
    if prefix == "T":  # accelerate stops at giga
        number, prefix = repr(float(number) * (1024 if binary else 1000)), "G"
    return convert_file_size_to_int(f"{number}{prefix}{'IB' if binary else 'B'}")


def format_size(n: int) -> str:
    """Bytes as the shortest exact size: 2147483648 -> 2GiB."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n % factor == 0:
            return f"{n // factor}{unit}"
    return str(n)


def parse_fraction(text: str) -> float:
    """Accept 0.25 or 25%."""
    try:
        return float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


# -- the recipe: a nested dict and its YAML text -------------------------------------------


def to_dict(obj) -> dict:
    """Every option of the tree ``obj`` as a nested dict (absent groups as None)."""
    out: dict = {}
    for f in dataclasses.fields(obj):
        if f.metadata.get("schema", True) is False:
            continue
        value = getattr(obj, f.name)
        out[f.name] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def to_yaml(obj, header: str = "") -> str:
    """The tree as commented YAML: each group's help above it, each option's help beside it."""
    cls = type(obj)
    lines = [f"# {line}" if line else "#" for line in header.splitlines()]
    nodes = {x.path: x for x in walk(cls)}
    helps = {p: _short(x.help) for p, x in nodes.items()}

    def emit(node, path: tuple[str, ...], depth: int) -> None:
        pad = "  " * depth
        for f in dataclasses.fields(node):
            if f.metadata.get("schema", True) is False or (path + (f.name,)) not in helps:
                continue
            value = getattr(node, f.name)
            sub = path + (f.name,)
            if dataclasses.is_dataclass(value):
                if depth == 0:
                    lines.append("")
                lines.append(f"{pad}{f.name}:" + (f"  # {helps[sub]}" if helps[sub] else ""))
                emit(value, sub, depth + 1)
            else:
                note = f"  # {helps[sub]}" if helps[sub] else ""
                show = getattr(nodes[sub], "show", None)
                text = show(value) if show is not None and value is not None else _scalar(value)
                lines.append(f"{pad}{f.name}: {text}{note}")

    emit(obj, (), 0)
    return "\n".join(lines).lstrip("\n") + "\n"


def from_dict(default, data: dict):
    """The tree ``default`` with the values of ``data`` (a nested dict, e.g. read from YAML).

    Unknown keys and bad values are ``LayerfoldError``s that name the key, suggest the
    nearest known one, and say what is allowed.
    """
    return with_values(default, _values(type(default), data, ()))


def _values(cls, data, path: tuple[str, ...]) -> dict:
    """{path: converted value} for the nested dict ``data`` at ``path`` of the tree ``cls``."""
    where = ".".join(path) or "the recipe"
    if not isinstance(data, dict):
        raise LayerfoldError(f"{where} must be a mapping of keys to values (got {data!r})")
    nodes = {x.path[-1]: x for x in walk(cls) if len(x.path) == len(path) + 1 and x.path[: len(path)] == path}
    out: dict = {}
    for key, value in data.items():
        node = nodes.get(str(key))
        if node is None:
            names = list(nodes)
            guess = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5) or _without_prefix(str(key), names)
            hint = f"; did you mean {guess[0]!r}?" if guess else f" (known: {', '.join(names)})"
            raise LayerfoldError(f"unknown key {key!r} in {where}{hint}")
        if isinstance(node, Group):
            if value is None:
                if not node.optional:
                    raise LayerfoldError(f"{'.'.join(node.path)} cannot be null")
                out[node.path] = None
            else:
                out.update(_values(cls, value, node.path))
        else:
            out[node.path] = convert(node, value)
    return out


def _without_prefix(key: str, names: list[str]) -> list[str]:
    """'heal_tokns' -> 'tokens': a key written with its flag's prefix."""
    stem = key.split("_", 1)[-1] if "_" in key else key
    return difflib.get_close_matches(stem, names, n=1, cutoff=0.5)


def parse_assignment(cls, text: str) -> tuple[tuple[str, ...], Any]:
    """``healing.tokens=65536`` -> (("healing", "tokens"), 65536), checked against the schema."""
    import yaml

    key, sep, raw = text.partition("=")
    if not sep:
        raise LayerfoldError(f"--set wants KEY=VALUE, e.g. healing.tokens=65536 (got {text!r})")
    path = tuple(k.strip() for k in key.strip().split("."))
    nested: dict = {}
    cursor = nested
    for part in path[:-1]:
        cursor = cursor.setdefault(part, {})
    try:
        cursor[path[-1]] = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        cursor[path[-1]] = raw
    values = _values(cls, nested, ())
    return path, values[path]


# -- the command line --------------------------------------------------------------------


class _Store(argparse.Action):
    """Stores the value under the option's dotted key (a repeated list flag appends)."""

    def __init__(self, *args, option: Option, const_value=None, **kwargs):
        self.option, self.const_value = option, const_value
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, value, option_string=None):
        if self.nargs == 0:
            value = self.const_value
        elif self.option.repeat:
            value = list(getattr(namespace, self.option.key, [])) + [value]
        setattr(namespace, self.option.key, value)


def _negative(flag: str) -> bool:
    """A flag that switches something off (``--no-eval``, ``--heal-no-norm``) sets False."""
    return flag.startswith("--no-") or "-no-" in flag


def _sets(o: Option) -> bool:
    return o.sets if o.sets is not None else not _negative(o.flag)


def _text_type(o: Option):
    """What argparse converts a flag's text with: its own messages ("invalid int value")."""
    if o.parse is not None:
        def parse(text):
            try:
                return o.parse(text)
            except LayerfoldError as e:
                raise argparse.ArgumentTypeError(str(e)) from None
        parse.__name__ = o.name
        return parse
    if o.kind is list and not o.repeat:
        return lambda text: [x.strip() for x in text.split(",") if x.strip()]
    return {int: int, float: float}.get(o.kind)


def _default_text(value) -> str | None:
    if value is None or value is False or value == [] or value == "":
        return None
    return _flag_value(value)


def add_arguments(parser: argparse.ArgumentParser, default) -> None:
    """Add every option of the tree ``default`` to ``parser``, one argument group per group,
    with the defaults of ``default`` shown in the help."""
    cls = type(default)
    opts = options(cls)
    taken: set[str] = {f for o in opts for f in [o.flag, *o.consts] if f}
    where: dict[tuple, argparse._ArgumentGroup] = {}
    for g in groups(cls):
        title = ".".join(g.path)
        where[g.path] = parser.add_argument_group(title, g.help or None)
        if g.switch:
            where[g.path].add_argument(g.switch, dest=f"{title}.__switch__", action="store_true",
                                       help=g.help.replace("%", "%%"))
    for o in opts:
        target = where.get(o.group, parser)
        value = get(default, o.path)
        shown = o.show(value) if o.show is not None and value is not None else _default_text(value)
        text = o.help + (f" (default: {shown})" if shown is not None and o.kind is not bool else "")
        text = text.replace("%", "%%")
        if o.positional:
            target.add_argument(o.key, nargs="+" if o.kind is list else "?", default=argparse.SUPPRESS,
                                action=_Store, option=o, type=_text_type(o) if o.kind is not list else None,
                                metavar=o.name.upper(), help=text)
            continue
        flags = [o.flag] + [a for a in o.aliases if a not in taken]
        taken.update(flags)
        flags.sort(key=len)  # -o before --output
        if o.kind is bool:
            target.add_argument(*flags, dest=o.key, nargs=0, action=_Store, option=o, const_value=_sets(o),
                                default=argparse.SUPPRESS, help=text)
        else:
            target.add_argument(*flags, dest=o.key, action=_Store, option=o, default=argparse.SUPPRESS,
                                type=_text_type(o), choices=o.choices, metavar=_metavar(o), help=text)
        for flag, (const, note) in o.consts.items():
            target.add_argument(flag, dest=o.key, nargs=0, action=_Store, option=o, const_value=const,
                                default=argparse.SUPPRESS, help=note.replace("%", "%%"))


def _metavar(o: Option) -> str:
    if o.metavar:
        return o.metavar
    if o.choices:
        return "{" + ",".join(map(str, o.choices)) + "}"
    return {int: "N", float: "X", list: "A,B", dict: "K=V,..."}.get(o.kind, o.name.upper().replace("_", "-"))


def from_arguments(default, namespace: argparse.Namespace):
    """The tree ``default`` with the values the command line gave."""
    cls = type(default)
    opts = options(cls)
    values = {o.path: getattr(namespace, o.key) for o in opts if hasattr(namespace, o.key)}
    for g in groups(cls):
        if not g.optional or get(default, g.path) is not None:
            continue
        given = [o for o in opts if o.path in values and o.path[: len(g.path)] == g.path]
        if g.switch:
            on = getattr(namespace, ".".join(g.path) + ".__switch__", False)
            if given and not on:
                raise LayerfoldError(f"{' and '.join(o.flag for o in given)} need {g.switch}")
            if on and not given:
                values[g.path] = g.cls()
        if g.requires and given and g.path + (g.requires,) not in values:
            key = g.path + (g.requires,)
            others = [o.flag for o in opts if o.group == g.path and o.path != key]
            flag = next(o.flag for o in opts if o.path == key)
            raise LayerfoldError(f"{', '.join(others[:-1])}{' and ' if len(others) > 1 else ''}{others[-1]} need {flag}")
    return with_values(default, values)


def command_line(obj, default, prefix: list[str]) -> str:
    """The shortest command line that makes ``obj`` from the command's defaults ``default``:
    ``prefix`` plus every option that differs, as its flag."""
    parts = list(prefix)
    cls = type(obj)
    required = set()
    for g in groups(cls):  # a group the defaults lack: switched on, its fields against its own defaults
        if g.optional and get(default, g.path) is None and get(obj, g.path) is not None:
            if g.switch:
                parts.append(g.switch)
            if g.requires:
                required.add(g.path + (g.requires,))
            default = with_values(default, {g.path: g.cls()})
    for o in options(cls):
        value, base = get(obj, o.path), get(default, o.path)
        if (value == base and o.path not in required) or (value is None and get(obj, o.group) is None):
            continue
        if o.positional:
            parts.insert(len(prefix), _flag_value(value))
            continue
        const = next((f for f, (c, _) in o.consts.items() if c == value), None)
        if const:
            parts.append(const)
        elif o.kind is bool:
            if value == _sets(o):
                parts.append(o.flag)
        elif value is not None:
            parts += [o.flag, o.show(value) if o.show is not None else _flag_value(value)]
    return shlex.join(parts)
