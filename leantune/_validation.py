"""Field checks for leantune's config dataclasses: a bad value raises ``ValueError`` naming ``Class.field`` and what
it must be, at construction — never a crash deep inside torch later."""

from __future__ import annotations

import math
import re
from typing import Any, Iterable


def _fail(obj: Any, name: str, what: str, value: Any) -> None:
    raise ValueError(f"{type(obj).__name__}.{name} must be {what}, got {value!r}.")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def check_int(obj: Any, name: str, minimum: int | None = None, maximum: int | None = None,
              optional: bool = False) -> None:
    value = getattr(obj, name)
    if value is None and optional:
        return
    if minimum == 1 and maximum is None:
        what = "a positive integer"
    else:
        what = "an integer" + (f" >= {minimum}" if minimum is not None else "") + (
            f" <= {maximum}" if maximum is not None else "")
    what += " or None" if optional else ""
    if not is_int(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(obj, name, what, value)


def check_number(obj: Any, name: str, minimum: float | None = None, strict: bool = False, maximum: float | None = None,
                 optional: bool = False) -> None:
    """A finite int/float; ``minimum`` inclusive (``strict``: exclusive)."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    bound = "" if minimum is None else (f" > {minimum}" if strict else f" >= {minimum}")
    bound += "" if maximum is None else f" <= {maximum}"
    what = f"a finite number{bound}" + (" or None" if optional else "")
    if not is_number(value):
        _fail(obj, name, what, value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        _fail(obj, name, what, value)
    if maximum is not None and value > maximum:
        _fail(obj, name, what, value)


def check_bool(obj: Any, name: str) -> None:
    value = getattr(obj, name)
    if not isinstance(value, bool):
        _fail(obj, name, "True or False", value)


def check_choice(obj: Any, name: str, choices: Iterable[Any]) -> None:
    value = getattr(obj, name)
    choices = tuple(choices)
    if not any(type(value) is type(c) and value == c for c in choices):  # 1 is not True, "1" is not 1
        _fail(obj, name, f"one of {list(choices)}", value)


def check_names(obj: Any, name: str, optional: bool = True, regex_items: bool = False) -> None:
    """None, a string (a regex peft full-matches, or a suffix), or a list/set/tuple of module names
    (``regex_items``: peft also splices each name into a regex, e.g. ``modules_to_save``)."""
    value = getattr(obj, name)
    if value is None and optional:
        return
    if isinstance(value, str) and value:
        items, what = [value], "a valid regex"
    elif isinstance(value, (list, set, tuple, frozenset)) and all(isinstance(v, str) and v for v in value):
        items, what = (list(value) if regex_items else []), "names that are valid regex fragments"
    else:
        _fail(obj, name, "a non-empty string or a list of module names" + (" or None" if optional else ""), value)
        return
    for item in items:
        try:
            re.compile(item)
        except re.error as err:
            _fail(obj, name, f"{what} ({err})", value)


def check_layers(obj: Any, name: str) -> None:
    """None, a layer index, or a list of layer indices (>= 0)."""
    value = getattr(obj, name)
    if value is None or (is_int(value) and value >= 0):
        return
    if isinstance(value, (list, tuple)) and value and all(is_int(v) and v >= 0 for v in value):
        return
    _fail(obj, name, "a layer index (>= 0), a list of them, or None", value)
