"""How error messages show values: a bad value may be huge (a config file's nested list), and a
message quotes only a short prefix of it."""

from __future__ import annotations

import reprlib
from typing import Any

SHOWN_CHARACTERS = 80


def shown(value: Any) -> str:
    """``repr(value)`` cut to at most SHOWN_CHARACTERS; the whole repr of a large value is never built."""
    short = reprlib.Repr()
    short.maxstring = short.maxother = 60
    short.maxlevel = 2
    text = " ".join(short.repr(value).split())  # one line, whatever the repr
    return text if len(text) <= SHOWN_CHARACTERS else f"{text[:SHOWN_CHARACTERS - 3]}..."
