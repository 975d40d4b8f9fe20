"""Settings declared once: a dataclass field, with its default and help, is the command-line flag
and the JSON config key.

``option(default, "help")`` declares a field; ``add_arguments(parser, Cls)`` derives the flags
(``--field-name``, or the ``flag`` given; bools get ``--x/--no-x``), ``build(Cls, args, config)``
makes the object from the dataclass defaults, then a JSON config (keys: the flag names with
underscores), then the flags actually given on the command line, so a flag always wins, including
one that sets a value back to its default. Nested dataclass fields are flattened (their flags must
not clash). Unknown config keys are refused, naming the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import typing
from pathlib import Path
from typing import Any, Callable, Iterator

from embeddinggemma_jax.io_utils import read_json


def option(default: Any = dataclasses.MISSING, help: str = "", *, flag: str | None = None,
           aliases: tuple[str, ...] = (), parse: Callable[[str], Any] | None = None, choices=None,
           nargs: str | None = None, metavar: str | None = None, cli: bool = True, required: bool = False,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with what its flag needs. ``parse`` turns the command-line string into the
    value (and checks it); ``cli=False`` keeps a field out of the flags and the config file;
    ``required``: ``build`` refuses to go without a value from the config file or a flag."""
    meta = {"help": help, "flag": flag, "aliases": tuple(aliases), "parse": parse, "choices": choices,
            "nargs": nargs, "metavar": metavar, "cli": cli, "required": required}
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


@dataclasses.dataclass(frozen=True)
class _Flag:
    path: tuple[str, ...]  # field names from the top dataclass down
    field: dataclasses.Field
    type: Any

    @property
    def flag(self) -> str:
        return self.field.metadata.get("flag") or "--" + self.field.name.replace("_", "-")

    @property
    def key(self) -> str:
        """The config-file key (and argparse dest): the flag's name with underscores."""
        return self.flag.lstrip("-").replace("-", "_")


def _flags(cls, path=()) -> Iterator[_Flag]:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _flags(t, path + (f.name,))
        elif f.metadata.get("cli", True) and "help" in f.metadata:
            yield _Flag(path + (f.name,), f, t)


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _is_bool(t) -> bool:
    return t is bool


def add_arguments(parser: argparse.ArgumentParser, cls, only: tuple[str, ...] | None = None) -> None:
    """One flag per declared field of ``cls`` (and of its nested dataclasses); ``only``: just the fields
    with these config keys (e.g. another command overriding a few of a config file's settings)."""
    flags = list(_flags(cls))
    if only is not None:
        missing = sorted(set(only) - {fl.key for fl in flags})
        if missing:
            raise KeyError(f"{cls.__name__} declares no settings {missing}")
        flags = [fl for fl in flags if fl.key in only]
    for fl in flags:
        m = fl.field.metadata
        default = _default(fl.field)
        shown = "required" if m.get("required") else f"default: {_show(default)}"
        kw: dict[str, Any] = dict(dest=fl.key, default=argparse.SUPPRESS, help=f"{m['help']} ({shown})".strip())
        if _is_bool(fl.type):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            if m.get("parse"):
                kw["type"] = m["parse"]
            elif fl.type in (int, str):
                kw["type"] = fl.type
            elif fl.type in (int | None, typing.Optional[int]):
                kw["type"] = int
            elif fl.type in (float, float | None, typing.Optional[float]):
                kw["type"] = finite_float
            for k in ("choices", "nargs", "metavar"):
                if m.get(k) is not None:
                    kw[k] = m[k]
        parser.add_argument(fl.flag, *m.get("aliases", ()), **kw)


def _show(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(str(x) for x in v) or "none"
    return "none" if v is None else str(v)


def resolve_config(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A JSON config file's keys, on top of its ``"base"`` file's (a path relative to the file; bases may
    have bases): the shared settings live once, each file holds what differs (``tpu/train/*.json``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist")
    if path.resolve() in _seen:
        raise ValueError(f"config file {path} is its own base (through {', '.join(map(str, _seen))})")
    values = read_json(path, expect=dict)
    base = values.pop("base", None)
    if base is None:
        return values
    if not isinstance(base, str):
        raise ValueError(f"config file {path}: \"base\" must be a file name, got {base!r}")
    merged = resolve_config(path.parent / base, _seen + (path.resolve(),))
    merged.update(values)
    return merged


def read_config(path: str | Path, cls, ignore: tuple[str, ...] = ()) -> dict[str, Any]:
    """The values of a JSON config file for ``cls`` (keys: flag names with underscores; keys starting
    with ``_`` are comments; keys in ``ignore`` are another reader's and left out). One-line errors name the file."""
    values = {k: v for k, v in resolve_config(path).items() if not k.startswith("_") and k not in ignore}
    known = {fl.key for fl in _flags(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"config file {path} has unknown keys {unknown}; use the flag names with underscores "
                         f"(e.g. {sorted(known)[0]})")
    return values


def build(cls, args: argparse.Namespace | dict | None = None, config: dict | None = None, **overrides):
    """``cls`` from its defaults, then ``config`` (a dict from ``read_config``), then ``args`` (only the
    flags given: ``add_arguments`` leaves the others out of the namespace), then ``overrides``."""
    given = dict(vars(args) if isinstance(args, argparse.Namespace) else (args or {}))
    values: dict[tuple[str, ...], Any] = {}
    for fl in _flags(cls):
        for source in (config or {}, given, overrides):
            if fl.key in source:
                v = source[fl.key]
                values[fl.path] = tuple(v) if isinstance(v, list) else v
        if fl.field.metadata.get("required") and values.get(fl.path) in (None, "", ()):
            raise ValueError(f"{fl.flag} is required (on the command line or in --config)")
    return _construct(cls, values, ())


def _construct(cls, values: dict, path: tuple[str, ...]):
    hints = typing.get_type_hints(cls)
    kw = {}
    for f in dataclasses.fields(cls):
        p = path + (f.name,)
        if dataclasses.is_dataclass(hints[f.name]):
            kw[f.name] = _construct(hints[f.name], values, p)
        elif p in values:
            kw[f.name] = values[p]
    return cls(**kw)


def flat_dict(obj) -> dict[str, Any]:
    """{config key: value} of a dataclass object: what a JSON config for it would hold."""
    out = {}
    for fl in _flags(type(obj)):
        v = obj
        for name in fl.path:
            v = getattr(v, name)
        out[fl.key] = list(v) if isinstance(v, tuple) else v
    return out


def differences(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every setting that differs (for resume refusals)."""
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def finite_float(text: str) -> float:
    """A float flag's value: a finite number ('nan' and 'inf' parse as floats but no setting means them)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return v


def check_ranges(obj, ranges: dict[str, tuple[float | None, float | None]] | None = None) -> None:
    """Refuse, in one line naming the flag, a float field that is not finite (a JSON config can hold NaN) and
    any int/float field outside ``ranges`` ({field name: (lowest, highest)}, None: unbounded; ints default to
    >= 0 when not listed). For a dataclass's ``__post_init__``."""
    ranges = ranges or {}
    for fl in _flags(type(obj)):
        v = obj
        for name in fl.path:
            v = getattr(v, name)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise ValueError(f"{fl.flag} must be a finite number, got {v}")
        lo, hi = ranges.get(fl.field.name, (0, None) if isinstance(v, int) else (None, None))
        if (lo is not None and v < lo) or (hi is not None and v > hi):
            where = " and ".join(x for x in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None
                                             else "") if x)
            raise ValueError(f"{fl.flag} must be {where}, got {v}")


def ints(text: str) -> tuple[int, ...]:
    """'768,512,256' -> (768, 512, 256)."""
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


__all__ = ["option", "add_arguments", "build", "read_config", "flat_dict", "differences", "ints", "floats",
           "finite_float", "check_ranges"]
