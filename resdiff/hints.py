"""Values against type hints: what a hint asks for in words (`describe`), a value converted to it (`coerce`),
and whether a value already is of it (`fits`). The config checks YAML and override values with them, and
`resdiff.model_folder` a saved model's config.json against its constructor's annotations.
"""

from __future__ import annotations

import collections.abc
import math
import numbers
import types
import typing

from .errors import UsageError

__all__ = ["describe", "coerce", "fits", "plain", "is_count", "check_count"]


def is_count(value: object, least: int = 1) -> bool:
    """Whether ``value`` is an integer (a bool is not one) of at least ``least``."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= least


def check_count(name: str, value: object, least: int = 1) -> None:
    """A UsageError naming ``name`` unless ``value`` is an integer of at least ``least`` (seeds, steps, batches,
    image counts: the one place this check and its wording live)."""
    if not is_count(value, least):
        need = {0: "a non-negative integer", 1: "a positive integer"}.get(least, f"an integer of at least {least}")
        raise UsageError(f"{name} must be {need}, got {value!r}")


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string", type(None): "null"}
_PLURAL_NAMES = {bool: "booleans", int: "integers", float: "numbers", str: "strings"}


def describe(hint) -> str:
    """What a type hint asks for, in words: 'a number or null', 'a list of strings'."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(a) for a in args)
    if origin is list:
        return f"a list of {_PLURAL_NAMES.get(args[0], 'values')}"
    if origin is tuple:
        return f"a list of {len(args)} {_PLURAL_NAMES.get(args[0], 'values')}"
    return _TYPE_NAMES.get(hint, getattr(hint, "__name__", str(hint)))


def _as_number(value) -> int | float | None:
    """value as an int or a finite float if it is a number or a numeric string (not a bool), else None."""
    if isinstance(value, str):
        for parse in (int, float):
            try:
                value = parse(value.strip())
                break
            except ValueError:
                pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return None if isinstance(value, float) and not math.isfinite(value) else value


def coerce(value, hint):
    """value converted to the type `hint` names (int -> float, list -> tuple, '1e-4' -> 0.0001).

    Raises TypeError when it can't be: a bool is not an int, None only fits an Optional field.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    number = _as_number(value)
    if hint is typing.Any:
        return value
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            try:
                return coerce(value, arg)
            except TypeError:
                pass
    elif hint is type(None) and value is None:
        return None
    elif hint is bool and isinstance(value, bool):
        return value
    elif hint is int and (isinstance(number, int) or isinstance(number, float) and number.is_integer()):
        return int(number)
    elif hint is float and number is not None:
        return float(number)
    elif hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    elif origin in (list, collections.abc.Sequence) and isinstance(value, (list, tuple)):
        return [coerce(v, args[0]) for v in value] if args else list(value)
    elif origin is tuple and isinstance(value, (list, tuple)) and len(args) == 2 and args[1] is Ellipsis:
        return tuple(coerce(v, args[0]) for v in value)
    elif origin is tuple and isinstance(value, (list, tuple)) and len(value) == len(args):
        return tuple(coerce(v, a) for v, a in zip(value, args))
    raise TypeError(f"{value!r} is not {describe(hint)}")


def fits(value, hint) -> bool:
    """Whether ``value`` already is of the type ``hint`` names (no conversion needed: "16" is no int, a list
    fits a tuple). Checks JSON configs of saved models against their constructor's annotations."""
    if typing.get_origin(hint) is None and hint is not typing.Any and hint not in _TYPE_NAMES:
        return True  # an annotation of a kind this does not judge
    try:
        return plain(coerce(value, hint)) == plain(value)
    except TypeError:
        return False


def plain(value):
    """Nested dicts, lists and tuples as dicts and lists only, ready for YAML or JSON."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
