"""Frozen job configs whose fields carry their own help; the CLI is generated from them.

``option(default, help)`` declares a field; ``add_config_arguments`` turns a
config class into argparse flags (``batch_size`` -> ``--batch-size``);
``config_from_args`` and ``config_from_mapping`` build the config back, the
latter refusing unknown keys by name (for run.toml and --config files).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal

REQUIRED = dataclasses.MISSING


class ConfigError(ValueError):
    """A config value or key is invalid; the message names it."""


POSITIONAL = "positional"
"""``option(..., flag=POSITIONAL)``: the field is a positional argument (e.g. `import-sae PATH`)."""


def option(default: Any = REQUIRED, help: str = "", flag: str | None = None, parse=None, choices=None) -> Any:
    """A config field with its help text (shown by --help and kept as its documentation).

    ``parse`` overrides how the flag's text becomes a value (e.g. ``auto_or(float)``).
    A ``tuple[X, ...]`` field is a repeatable flag (``--feature 3 --feature 7``); ``choices`` limits
    a ``str`` field to values another module owns (a ``Literal`` annotation does it for fixed ones).
    """
    metadata = {"help": help, "flag": flag, "parse": parse, "choices": choices}
    if default is REQUIRED:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _unwrap_optional(annotation) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def _flag(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def add_config_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add one flag per field of ``cls`` (a frozen dataclass made with ``option``), plus ``--config FILE``."""
    parser.add_argument(
        "--config",
        dest="config_file",
        default=None,
        help="TOML file of option values (keys as in run.toml); flags given on the command line win",
    )
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        if field.name in skip:
            continue
        kwargs = _argument_kwargs(field, hints[field.name])
        if field.metadata.get("flag") == POSITIONAL:
            kwargs.pop("dest")
            parser.add_argument(field.name, **kwargs)
        else:
            parser.add_argument(_flag(field), **kwargs)


def _argument_kwargs(field: dataclasses.Field, hint) -> dict[str, Any]:
    """argparse keywords for one config field: its type or choices, help with the default, no default value."""
    annotation, _ = _unwrap_optional(hint)
    kwargs: dict[str, Any] = {"dest": field.name, "help": field.metadata.get("help", ""), "default": argparse.SUPPRESS}
    if typing.get_origin(annotation) is tuple:
        annotation = typing.get_args(annotation)[0]
        kwargs["action"] = "append"
    if field.metadata.get("parse") is not None:
        kwargs["type"] = field.metadata["parse"]
    elif annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(annotation) is Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    else:
        kwargs["type"] = annotation
    if field.metadata.get("choices") is not None:
        kwargs["choices"] = list(field.metadata["choices"])
    if _is_required(field):
        kwargs["help"] += " (required)"
    elif field.default not in (None, ()):
        kwargs["help"] += f" (default: {field.default})"
    return kwargs


def auto_or(kind):
    """Parse "auto" as None (resolved later), anything else with ``kind``."""

    def parse(text: str):
        if text == "auto":
            return None
        try:
            return kind(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected 'auto' or a {kind.__name__}, got {text!r}") from error

    parse.__name__ = f"auto or {kind.__name__}"
    return parse


def counted(minimum: int):
    """An argparse type: an integer >= ``minimum`` (e.g. counted(1) for --limit)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from error
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a finite number (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from error
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def config_from_args(cls: type, args: argparse.Namespace, **overrides):
    """Build ``cls`` from a --config file (if any), then the flags given, then ``overrides``."""
    import tomllib

    names = {f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    path = getattr(args, "config_file", None)
    if path:
        try:
            with open(path, "rb") as handle:
                values.update(config_from_mapping(dict, tomllib.load(handle), path, names, fields_of=cls))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise ConfigError(f"cannot read config file {path}: {error}") from error
        except UnicodeDecodeError as error:
            raise ConfigError(f"cannot read config file {path}: not UTF-8 text ({error.reason})") from error
    values.update({k: tuple(v) if isinstance(v, list) else v for k, v in vars(args).items() if k in names})
    values.update(overrides)
    missing = sorted(f.name for f in dataclasses.fields(cls) if f.name not in values and _is_required(f))
    if missing:
        raise ConfigError(f"missing required option --{missing[0].replace('_', '-')}")
    for name, value in values.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    return cls(**values)


def _is_required(field: dataclasses.Field) -> bool:
    return field.default is REQUIRED and field.default_factory is REQUIRED


def config_from_mapping(cls: type, mapping: dict, where: str, names: set[str] | None = None, fields_of=None):
    """Build ``cls`` from a dict (a TOML table); an unknown key or a value of the wrong type is an error naming it.

    ``fields_of`` is the config class whose field types check the values (default: ``cls``).
    """
    schema = fields_of or cls
    names = names if names is not None else {f.name for f in dataclasses.fields(schema)}
    unknown = sorted(set(mapping) - names)
    if unknown:
        raise ConfigError(f"unknown key {unknown[0]!r} in {where}; known keys: {', '.join(sorted(names))}")
    if dataclasses.is_dataclass(schema):
        hints = typing.get_type_hints(schema)
        fields = {f.name: f for f in dataclasses.fields(schema)}
        mapping = {key: checked_value(fields[key], hints[key], value, where) for key, value in mapping.items()}
    return cls(**mapping)


def _type_name(annotation) -> str:
    if typing.get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(c) for c in typing.get_args(annotation))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(annotation, "a value")


def checked_value(field: dataclasses.Field, hint, value, where: str):
    """``value`` (from a TOML file) converted to the field's type, or a ConfigError naming the file and key."""
    annotation, optional = _unwrap_optional(hint)
    if optional and value == "auto" and field.metadata.get("parse") is not None:
        return None
    ok = False
    if typing.get_origin(annotation) is Literal:
        ok = value in typing.get_args(annotation)
    elif annotation is bool:
        ok = isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif annotation is str:
        ok = isinstance(value, str)
    else:
        ok = True
    if not ok:
        auto = " or 'auto'" if optional and field.metadata.get("parse") is not None else ""
        raise ConfigError(f"{where}: {field.name} = {value!r} is not valid: expected {_type_name(annotation)}{auto}")
    return value


def config_to_mapping(config) -> dict:
    """A config as a plain dict (for run.toml)."""
    return dataclasses.asdict(config)


def require(condition: bool, message: str) -> None:
    """Raise ConfigError(message) unless condition holds (for __post_init__ checks)."""
    if not condition:
        raise ConfigError(message)


DEVICE_KINDS = ("cpu", "cuda", "mps")


def check_device(flag: str, value: str, allow_auto: bool = False) -> str:
    """``value`` if it names a device this machine has, else a ConfigError naming ``flag`` and what to use.

    Catches what torch would only report deep inside a job: names torch does not parse
    ('bogus', 'gpu0'), 'cuda' without CUDA, 'cuda:3' on a one-GPU machine, 'mps' off Apple
    silicon, and device types saescope does not run on ('meta', 'xla'). Imports torch when called.
    """
    if allow_auto and value == "auto":
        return value
    import torch

    usable = "cpu, cuda, cuda:N or auto" if allow_auto else "cpu, cuda or cuda:N"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{flag} {value!r} is not a device: use {usable}") from None
    if device.type not in DEVICE_KINDS:
        raise ConfigError(f"{flag} {value!r}: saescope runs on {', '.join(DEVICE_KINDS)} only: use {usable}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{flag} {value!r}: torch sees no MPS (Apple GPU) on this machine: use {flag} cpu")
    if device.type == "cuda":
        _check_cuda(flag, value, device)
    return value


def _check_cuda(flag: str, value: str, device) -> None:
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"{flag} {value!r}: torch sees no CUDA GPU on this machine: use {flag} cpu")
    count = torch.cuda.device_count()
    if device.index is not None and device.index >= count:
        have = f"cuda:0-cuda:{count - 1}" if count > 1 else "cuda:0"
        raise ConfigError(f"{flag} {value!r}: this machine has {count} CUDA GPU{'s' * (count > 1)}: use {have}")


def check_can_create(flag: str, folder: Path | str) -> None:
    """ConfigError naming ``flag`` unless ``folder`` exists as a writable folder or could be made; makes nothing.

    Walks up to the nearest existing ancestor: it must be a folder (not a file) that this
    process may write into.
    """
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        what = "is a file" if existing == folder else f"is under {existing}, a file"
        raise ConfigError(f"{flag} {folder} {what}, not a folder: choose another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {folder}: cannot write in {existing} (permission denied): choose a writable folder")
