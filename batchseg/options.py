"""Options declared once. Each ``segment`` and ``train`` option is one dataclass field whose metadata holds
its help, its parser and its checks, beside its name and default; argparse, ``--help``, the Python API's
checks and README's option tables are all made from it (as detectron2's config is the one source of its
defaults).

A check is a function of a value that says what is wrong with it, in words that follow the option's name
(``"must be at least 1, not 0"``), or None. Checks that relate two options are the config's
``relations()``: ``(ok, message)`` rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from batchseg.errors import BatchsegError

Check = Callable[[Any], "str | None"]
RAY_FRACTION = 1e-4  # the finest fraction of a CPU or GPU Ray takes


@dataclasses.dataclass(frozen=True)
class Option:
    """What an option is beside its field's name and default. ``parse`` turns the command line's text into
    a value (default: the default's type); ``default_text`` is how ``--help`` and README show a default
    the field leaves to be worked out (None); options sharing a ``group`` are alternatives of which
    exactly one is given."""

    help: str
    parse: Callable[[str], Any] | None = None
    checks: tuple[Check, ...] = ()
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    default_text: str | None = None
    group: str | None = None


def option(
    default: Any = dataclasses.MISSING,
    help: str = "",
    *,
    parse: Callable[[str], Any] | None = None,
    check: Check | Sequence[Check] = (),
    choices: Sequence[str] | None = None,
    metavar: str | None = None,
    default_text: str | None = None,
    group: str | None = None,
    factory: Callable[[], Any] | None = None,
) -> Any:
    """A config field that is also an option (``factory`` for a mutable default)."""
    checks = (check,) if callable(check) else tuple(check)
    if choices is not None:
        choices = tuple(choices)
        checks = (one_of(choices), *checks)
    meta = {"option": Option(help, parse, checks, choices, metavar, default_text, group)}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def flag(name: str) -> str:
    """A field's option on the command line: ``score_threshold`` -> ``--score-threshold``."""
    return "--" + name.replace("_", "-")


def declared(config: Any) -> Iterator[tuple[dataclasses.Field[Any], Option]]:
    """The options of a config class (or instance), in declaration order."""
    for f in dataclasses.fields(config):
        if "option" in f.metadata:
            yield f, f.metadata["option"]


def default_of(f: dataclasses.Field[Any]) -> Any:
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return f.default


def shown_default(f: dataclasses.Field[Any], opt: Option) -> str | None:
    """The default as ``--help`` and README write it; None for a required option or a flag."""
    value = default_of(f)
    if opt.default_text is not None:
        return opt.default_text
    if value is dataclasses.MISSING or value is None or isinstance(value, bool) or value == {}:
        return None
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


def help_text(f: dataclasses.Field[Any], opt: Option) -> str:
    default = shown_default(f, opt)
    return opt.help + (f" (default: {default})" if default is not None else "")


def check(config: Any) -> None:
    """Every option's checks, then the config's relations; the first problem is a :class:`BatchsegError`
    naming the option. Run before anything is written or started."""
    for f, opt in declared(config):
        value = getattr(config, f.name)
        if value is None:
            if default_of(f) is None:
                continue  # None is this option's "work it out" default
            raise BatchsegError(f"{flag(f.name)} must be given, not None")
        for one in opt.checks:
            try:
                problem = one(value)
            except (TypeError, ValueError, AttributeError):
                problem = f"has the wrong type: {value!r}"
            if problem:  # a problem may start with ": " to read "--option: ..."
                raise BatchsegError(f"{flag(f.name)}{'' if problem.startswith(':') else ' '}{problem}")
    for ok, message in config.relations():
        if not ok:
            raise BatchsegError(message)


def add_arguments(parser: argparse.ArgumentParser, config_class: type) -> None:
    """An argparse option per declared field. Every default is None on the command line, so that an option
    left out takes the config's own default (see :func:`from_args`)."""
    groups: dict[str, Any] = {}
    for f, opt in declared(config_class):
        default = default_of(f)
        kwargs: dict[str, Any] = {"help": help_text(f, opt).replace("%", "%%"), "default": None}
        if isinstance(default, bool):
            kwargs["action"] = "store_true"
        else:
            kwargs |= {"type": opt.parse or type(default), "choices": opt.choices, "metavar": opt.metavar}
        target: Any = parser
        if opt.group is not None:
            if opt.group not in groups:
                groups[opt.group] = parser.add_mutually_exclusive_group(required=True)
            target = groups[opt.group]
        elif default is dataclasses.MISSING:
            kwargs["required"] = True
        target.add_argument(flag(f.name), **kwargs)


def from_args(config_class: type, args: argparse.Namespace) -> Any:
    """The config of parsed arguments: each option given, the config's defaults for the rest."""
    given = {f.name: getattr(args, f.name) for f, _ in declared(config_class)}
    return config_class(**{k: v for k, v in given.items() if v is not None})


def markdown_table(config_class: type) -> str:
    """README's table of a command's options: each option, its default (values as code, words as words),
    its help."""
    rows = ["| option | default | what it does |", "|---|---|---|"]
    options = list(declared(config_class))
    for f, opt in options:
        if opt.group is not None:
            others = [flag(g.name) for g, o in options if o.group == opt.group and g is not f]
            default = f"required, unless {' or '.join(others)}"
        elif default_of(f) is dataclasses.MISSING:
            default = "required"
        elif opt.default_text is not None and " " in opt.default_text:
            default = opt.default_text  # words
        else:
            shown = shown_default(f, opt)
            default = f"`{shown}`" if shown is not None else ""
        cells = (f"`{flag(f.name)}`", default, opt.help)
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows)


# Checks: each returns what is wrong, in words after the option's name, or None.


def at_least(minimum: int) -> Check:
    return lambda v: None if v >= minimum else f"must be at least {minimum}, not {v}"


def between(low: float, high: float, high_open: bool = False) -> Check:
    """In [low, high] (or [low, high)); NaN is not."""
    shown = f"[{low}, {high}{')' if high_open else ']'}"
    return lambda v: (
        None if low <= v and (v < high if high_open else v <= high) else f"must be in {shown}, not {v}"
    )


def positive(what: str = "a positive number") -> Check:
    return lambda v: None if 0 < v < math.inf else f"must be {what}, not {v}"


def zero_or_positive(zero: str = "0") -> Check:
    return lambda v: None if 0 <= v < math.inf else f"must be {zero} or a positive number, not {v}"


def ray_share(unit: str, zero: bool) -> Check:
    """A share of a Ray resource per actor or worker: from Ray's finest fraction up (or 0 for none)."""
    if zero:
        return lambda v: (
            None
            if v == 0 or RAY_FRACTION <= v < math.inf
            else f"must be 0 (CPU) or from {RAY_FRACTION} {unit} up, not {v}"
        )
    return lambda v: (
        None if RAY_FRACTION <= v < math.inf else f"must be from {RAY_FRACTION} {unit} up, not {v}"
    )


def one_of(choices: Sequence[str]) -> Check:
    return lambda v: None if v in choices else f"must be one of {', '.join(choices)}, not {v!r}"


def not_empty(choices: str) -> Check:
    return lambda v: None if v.strip() else f"must not be empty: {choices}"


# Parsers for argparse: text -> value, or argparse.ArgumentTypeError in words.


def uri(text: str) -> str:
    """A path or fsspec URI: an empty one would silently mean the working directory."""
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a path or URI, not an empty string")
    return text


def numbers(kind: Callable[[str], Any], example: str) -> Callable[[str], tuple[Any, ...]]:
    """Comma-separated numbers, e.g. ``640,672,704``."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(kind(v) for v in text.split(","))
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like {example}, not {text!r}") from None

    return parse


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def checked(kind: Callable[[str], Any], *checks: Check) -> Callable[[str], Any]:
    """An argparse type: ``kind`` of the text, refused at parse time by the first check it fails."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            what = {"int": "a whole number", "float": "a number"}.get(kind.__name__, kind.__name__)
            raise argparse.ArgumentTypeError(f"expected {what}, not {text!r}") from None
        for one in checks:
            problem = one(value)
            if problem:
                raise argparse.ArgumentTypeError(problem)
        return value

    return parse


STORAGE_OPTIONS_HELP = 'JSON passed to fsspec, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\''
