"""Typed options, the one mechanism behind every config dataclass and every command's own options
(``simcot.models.config``, ``simcot.train.config``, ``simcot.launchers.cli``):

- ``opt(default, "doc")``: a field with a default and the doc that becomes its ``--help`` line;
- ``cast``: a YAML or command-line value (fire hands over str, int, float, bool or a tuple for
  "a,b") as the field's declared type;
- ``help_lines``: ``--name=default`` and the doc of every field; ``options_help``: a command's
  ``--help``, its docstring (usage, description) and those lines;
- ``parse_options``: a command's arguments as an instance of its options dataclass, with one-line
  errors for an unknown option, a bad value or a missing required one.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import field
from typing import Any


class OptionError(ValueError):
    """A bad command-line option (unknown, of the wrong type, missing), said in one line."""


def opt(default: Any, doc: str, *, required: bool = False) -> Any:
    """A dataclass field with a default and a help line; `required`: a command refuses to run without it."""
    meta = {"doc": doc, **({"required": True} if required else {})}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def field_types(cls: type) -> dict[str, Any]:
    """Field name -> its declared type (string annotations resolved)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def is_section(tp: Any) -> bool:
    """A field whose type is itself a dataclass: a section of options (``--section.key``)."""
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def fields_of(cls: type, *names: str) -> type:
    """A dataclass of some of `cls`'s fields, with their types, defaults and docs: the options of a
    command that reads part of a config section, declared once in that section."""
    types, by_name = field_types(cls), {f.name: f for f in dataclasses.fields(cls)}
    return dataclasses.make_dataclass(
        f"{cls.__name__}Fields",
        [(n, types[n], field(default=by_name[n].default, default_factory=by_name[n].default_factory,
                             metadata=by_name[n].metadata)) for n in names])


def type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"comma-separated {type_name(typing.get_args(tp)[0])}s"
    return getattr(tp, "__name__", str(tp))


def cast(value: Any, tp: Any) -> Any:
    """`value` as type `tp` (bool, int, float, str, list[...]), or ValueError 'expected T, got V'.
    A list is given as "a,b" or as fire's tuple; other types pass through unchanged."""
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else int(value)
            except ValueError:
                pass
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, (list, tuple)):  # fire turns "a,b" into a tuple
            return ",".join(str(v) for v in value)
        return "" if value is None else str(value)
    elif typing.get_origin(tp) is list:
        items = value if isinstance(value, (list, tuple)) else str(value).split(",")
        items = [v.strip() if isinstance(v, str) else v for v in items]
        try:
            return [cast(v, typing.get_args(tp)[0]) for v in items if v != ""]
        except ValueError:
            pass
    else:
        return value
    given = ",".join(map(str, value)) if isinstance(value, (list, tuple)) else value  # as typed
    raise ValueError(f"expected {type_name(tp)}, got {given!r}")


def shown(value: Any) -> str:
    """A default as ``--help`` shows it: repr, a list as the comma-separated string one types."""
    return repr(",".join(map(str, value))) if isinstance(value, list) else repr(value)


def help_lines(cls: type, prefix: str = "") -> list[str]:
    """``--name=default`` and the field's doc for every field of `cls`, a section's under ``[name]``."""
    lines, inst, types = [], cls(), field_types(cls)
    for f in dataclasses.fields(cls):
        if is_section(types[f.name]):
            lines += ["", f"  [{prefix}{f.name}]", *help_lines(types[f.name], f"{prefix}{f.name}.")]
        else:
            doc = f.metadata.get("doc", "") + (" (required)" if f.metadata.get("required") else "")
            lines += [f"  --{prefix}{f.name}={shown(getattr(inst, f.name))}", f"        {doc}"]
    return lines


def options_help(cls: type) -> list[str]:
    """A command's ``--help`` from its options dataclass: the docstring's first line is the usage,
    the rest the description, then every option with its default and doc."""
    usage, _, about = inspect.cleandoc(cls.__doc__).partition("\n")
    return [f"usage: {usage}", "", about.strip(), "", "options (default):", *help_lines(cls)]


def required_fields(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.metadata.get("required")]


def parse_options(cls: type, args: tuple, kw: Mapping[str, Any], command: str, *,
                  passes_on: Callable[[str], bool] | None = None,
                  defaults: Mapping[str, Any] | None = None) -> tuple[Any, dict[str, Any]]:
    """fire's positional `args` and keyword `kw` as an instance of `cls`, and the keywords that are
    not its fields but that `passes_on` accepts (a command's run-config options); any other is an
    error. Positional arguments fill the fields in their order, as in a call; `defaults` replace the
    dataclass's own (options given still win)."""
    names = [f.name for f in dataclasses.fields(cls)]
    if len(args) > len(names):
        raise OptionError(f"too many arguments for {command}: {' '.join(map(str, args[len(names):]))}")
    given = dict(zip(names, args))
    twice = [k for k in kw if k in given]
    if twice:
        raise OptionError(f"option(s) for {command} given twice: {', '.join('--' + k for k in twice)}")
    given.update((k, v) for k, v in kw.items() if k in names)
    types, values = field_types(cls), {}
    for key, value in given.items():  # fire reads `--sort -col` as --sort (True) and --col
        if value is True and types[key] is not bool:
            raise OptionError(f"--{key} needs a value (one that starts with '-' is written --{key}=-VALUE)")
    unknown = [k for k in kw if k not in names and not (passes_on and passes_on(k))]
    if unknown:
        raise OptionError(f"unknown option(s) for {command}: {', '.join('--' + k for k in unknown)}")
    other = {k: v for k, v in kw.items() if k not in names}
    for key, value in {**(defaults or {}), **given}.items():
        try:
            values[key] = cast(value, types[key])
        except ValueError as e:
            raise OptionError(f"--{key}: {e}") from None
    missing = [k for k in required_fields(cls) if values.get(k) in (None, "")]
    if missing:
        raise OptionError(f"{' and '.join('--' + k for k in missing)} {'is' if len(missing) == 1 else 'are'} "
                          f"required")
    return cls(**values), other
