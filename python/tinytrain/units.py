"""Byte quantities as users write them ("256KB", "1.5 MiB", 262144)."""
from __future__ import annotations

import re
from typing import Union

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 1024,
    "kib": 1024,
    "k": 1024,
    "mb": 1024**2,
    "mib": 1024**2,
    "m": 1024**2,
    "gb": 1024**3,
    "gib": 1024**3,
}
_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: Union[str, int, float]) -> int:
    """Parse a memory size. KB means 1024 bytes, as the seed paper and MCU datasheets use it."""
    if isinstance(value, bool):
        raise ValueError(f"not a memory size: {value!r}")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError(f"memory size must not be negative: {value!r}")
        return int(value)
    match = _PATTERN.match(str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"not a memory size: {value!r} (examples: 256KB, 1MB, 262144)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def format_bytes(n: int) -> str:
    if n >= 1024**2:
        return f"{n / 1024**2:.2f} MB"
    if n >= 1024:
        return f"{n / 1024:.1f} KB"
    return f"{n} B"
