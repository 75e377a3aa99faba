"""The sandbox levels, in their own module so the plugin side (the zygote, every worker)
can name them without importing the config models and pydantic with them."""

from __future__ import annotations

from enum import StrEnum

__all__ = ["SandboxLevel"]


class SandboxLevel(StrEnum):
    """How tightly a plugin is confined; each level adds to the one before (README)."""

    NONE = "none"
    MINIMAL = "minimal"
    STANDARD = "standard"
    STRICT = "strict"
    PARANOID = "paranoid"

    @property
    def rank(self) -> int:
        """0 for none ... 4 for paranoid: a higher level includes every lower one."""
        return _RANK[self]


_RANK = {level: i for i, level in enumerate(SandboxLevel)}
