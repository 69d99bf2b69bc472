"""Dataclasses from their asdict() form, every field's presence and type checked on the way: the one reader behind
each on-disk format in mmgpt/contract/ (the manifest, the engine config and record, the checkpoint meta)."""
from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path

CONF = Path(__file__).resolve().parents[2] / "conf"  # the Hydra configs: the one source of every default


def conf_defaults(file: str, section: str | None = None) -> dict:
    """A conf/ file (or one top-level section of it) as plain values, for code that builds a typed config without
    Hydra: benchmarks, tests."""
    import yaml
    raw = yaml.safe_load((CONF / file).read_text())
    return raw[section] if section else raw


def build(cls, raw, where: str):
    """A `cls` from its asdict() form. Raises TypeError for a missing or mistyped field, naming the field by its
    dotted path under `where` (a KeyError's message would come quoted)."""
    if not isinstance(raw, dict):
        raise TypeError(f"{where or 'the record'} must be an object, got {type(raw).__name__}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = f"{where}.{f.name}" if where else f.name
        if f.name not in raw:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:
                continue
            raise TypeError(f"missing field '{key}'")
        kwargs[f.name] = convert(hints[f.name], raw[f.name], key)
    return cls(**kwargs)


def convert(hint, value, key):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, key)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):  # the first alternative that fits
            try:
                return convert(option, value, key)
            except (KeyError, TypeError) as e:
                errors.append(str(e))
        raise TypeError(errors[0] if len(errors) == 1 else f"'{key}' is none of {[str(a) for a in args]}: {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise TypeError(f"'{key}' must be an object")
        return {k: convert(args[1], v, f"{key}.{k}") for k, v in value.items()} if args else value
    if origin is list:
        if not isinstance(value, list):
            raise TypeError(f"'{key}' must be a list")
        return [convert(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if hint is bool and not isinstance(value, bool):
        raise TypeError(f"'{key}' must be true or false, got {value!r}")
    if hint is int and (not isinstance(value, int) or isinstance(value, bool)):
        raise TypeError(f"'{key}' must be an integer, got {value!r}")
    if hint is float and (not isinstance(value, (int, float)) or isinstance(value, bool)):
        raise TypeError(f"'{key}' must be a number, got {value!r}")
    if hint is str and not isinstance(value, str):
        raise TypeError(f"'{key}' must be a string, got {value!r}")
    return float(value) if hint is float else value
