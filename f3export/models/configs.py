"""Checkpoint configs are untrusted input: each value is checked against the type its network expects.

A ``config.json`` with ``"block_out_channels": "64"`` or ``"norm_num_groups": 0``
otherwise fails deep inside a constructor (``TypeError``, ``ZeroDivisionError``)
or, worse, builds a network that fails at its first forward. One checker serves
the families' own config dataclasses (their field types) and the diffusers
classes (their constructors' annotations); errors name the file and the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from typing import Any, Callable, Union, get_args, get_origin

import torch

from ..errors import CheckpointError

# What a diffusers constructor raises for a config it cannot build (an int where a list belongs, a zero divisor).
CONFIG_ERRORS = (TypeError, ValueError, ZeroDivisionError, RuntimeError, AttributeError, KeyError, IndexError,
                 OverflowError)


def _type_text(tp: Any) -> str:
    """A type as a JSON reader knows it: ``int``, ``list[int]``, ``int | list[int] | None``."""
    text = tp.__name__ if isinstance(tp, type) and not get_args(tp) else str(tp)
    return text.replace("typing.", "").replace("NoneType", "None").replace(", ...", "").replace("tuple", "list")


def _shown(value: Any) -> str:
    text = repr(list(value) if isinstance(value, tuple) else value)
    return text if len(text) <= 60 else text[:60] + "..."


def _conforms(value: Any, tp: Any) -> bool:
    """Whether a JSON value has type ``tp`` (JSON lists stand for tuples; an int is a float)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        return any(_conforms(value, arg) for arg in get_args(tp))
    if tp is type(None):
        return value is None
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        items = [arg for arg in get_args(tp) if arg is not Ellipsis]
        return not items or all(any(_conforms(v, a) for a in items) for v in value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp in (bool, str):
        return isinstance(value, tp)
    return True  # Any, dicts, callables: nothing a JSON value can be checked against


def _element_type(tp: Any) -> Any:
    """int for ``int``, ``list[int]``, ``tuple[int, int]``, ``int | None``."""
    args = [arg for arg in get_args(tp) if arg not in (Ellipsis, type(None))]
    return _element_type(args[0]) if args else tp


def _numbers(value: Any) -> list[int | float]:
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _numbers(v)]
    return [value] if isinstance(value, (int, float)) and not isinstance(value, bool) else []


def check_config_values(values: dict[str, Any], hints: dict[str, Any], source: str,
                        low: Callable[[str], float]) -> None:
    """Every value in ``values`` whose key has a type in ``hints``: of that type, finite and at least ``low(key)``
    (every number of a list too)."""
    for key, value in values.items():
        if key not in hints:
            continue
        expected = _type_text(hints[key])
        if not _conforms(value, hints[key]):
            raise CheckpointError(f"{source}: {key} = {_shown(value)} is not of type {expected}")
        for number in _numbers(value):
            if not math.isfinite(number):
                raise CheckpointError(f"{source}: {key} = {_shown(value)} is not a finite number")
            if number < low(key):
                raise CheckpointError(f"{source}: {key} = {_shown(value)} must be at least {low(key)}")


def check_dataclass_config(cls: type, values: dict[str, Any], source: str) -> None:
    """A family's config dataclass: integers at least 1 and other numbers at least 0, unless a field's
    ``metadata['low']`` says otherwise."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def low(key: str) -> float:
        counts = _element_type(hints[key]) is int  # channels, layers, heads: none of them may be 0
        return fields[key].metadata.get("low", 1 if counts else 0)

    check_config_values(values, hints, source, low)


def build_diffusers_model(cls: type, config: dict[str, Any], source: str) -> torch.nn.Module:
    """``cls.from_config(config)``, its values checked against the constructor's annotations first (no
    negative numbers), and whatever the constructor still raises named as the config file's fault."""
    hints = typing.get_type_hints(cls.__init__)
    check_config_values(config, {k: v for k, v in hints.items() if k in inspect.signature(cls.__init__).parameters},
                        source, low=lambda key: 0)
    try:
        return cls.from_config(config)
    except CONFIG_ERRORS as exc:
        reason = str(exc).splitlines()[0] if str(exc) else ""
        raise CheckpointError(f"{source}: {cls.__name__} cannot be built from it ({type(exc).__name__}: "
                              f"{reason})") from None
