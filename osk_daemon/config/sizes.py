"""Human byte sizes for the config file: ``"16MiB"``, ``"512KiB"``, ``"1G"``.

Operators write limits the way they think of them, so size keys accept either a plain
integer (bytes) or a number with a unit. The units follow systemd's convention, which is
what people running daemons on Linux already know: single letters (``K``, ``M``, ``G``,
``T``) and the IEC names (``KiB``...) are powers of 1024; the SI names (``KB``, ``MB``...)
are powers of 1000. Units are case-insensitive and may be separated from the number by
spaces; fractions are allowed and rounded down to whole bytes.
"""

from __future__ import annotations

import re

__all__ = ["format_size", "parse_size"]

_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_size(value: int | str) -> int:
    """Return ``value`` in bytes.

    Integers pass through unchanged (``bool`` is rejected). Strings are ``<number><unit>``.
    Raises ``ValueError`` with a short, human reason for anything else, including negative
    numbers and unknown units.
    """
    if isinstance(value, bool):
        raise ValueError(f"expected a size like '16MiB', got {str(value).lower()}")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"must be >= 0, got {value}")
        return value
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '16MiB', got {value!r}")
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"expected a size like '16MiB', got {value!r}")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(
            f"unknown size unit {unit!r} in {value!r} (use B, KiB, MiB, GiB, K, M, G, KB, MB...)"
        )
    if "." in number:
        return int(float(number) * factor)
    return int(number) * factor


def format_size(n: int) -> str:
    """Render ``n`` bytes with the largest IEC unit that divides it exactly (``16MiB``)."""
    for unit, factor in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if n and n % factor == 0:
            return f"{n // factor}{unit}"
    return f"{n}B"
