"""The one check of integer arguments and parameters: Python and numpy integers are accepted, bool, float, str and
everything else refused with a ValueError naming the argument, its allowed range and where it came from."""
from __future__ import annotations

import numbers
from typing import Any

INT_MAX = 2 ** 31 - 1  # FAISS takes its sizes and counts as C ints


def integer(value: Any, name: str, low: int = 0, high: int | None = INT_MAX, *, where: str = "",
            fix: str = "") -> int:
    """``value`` as a Python int within ``[low, high]``; ValueError ``"<where>: <name> = <value> ...; <fix>"``."""
    prefix = f"{where}: " if where else ""
    rule = f"an integer from {low} to {high}" if high is not None else f"an integer >= {low}"
    tail = f"; {fix}" if fix else ""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{prefix}{name} = {value!r} ({type(value).__name__}) must be {rule}{tail}")
    value = int(value)
    if value < low or (high is not None and value > high):
        raise ValueError(f"{prefix}{name} = {value} is out of range: it must be {rule}{tail}")
    return value
