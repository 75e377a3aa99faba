"""The plugin manifest, ``osk-plugin.toml``: what one version of a plugin says about itself.

Each installed version of a plugin has its own folder with its code and this file::

    name = "echo"
    version = "2.3.0"
    entry = "echo.plugin:Echo"
    offline_capable = false

    [provides]                      # named services and their versions
    "echo.api" = "2.1.0"

    [[requires]]                    # plugins (or services) with npm ranges
    name = "store"
    range = "^3.0"
    optional = false                # optional: used when present, never blocks a start

    [compatibility]                 # how this version relates to earlier ones
    "2.2.0" = "fully-compatible"
    "1.9.0" = "breaking-changes"

    [[breaking_changes]]
    type = "api-renamed"            # api-removed | api-renamed | behavior-changed
    description = "echo() is now say()"
    migration_guide = "Rename calls to echo() into say()."
    automated_migration = "echo.migrations:rename_echo"

The models are frozen pydantic models in strict mode (TOML already has types), with versions
and ranges parsed into ``Version``/``Range`` values. ``load_manifest`` reads the file and turns
the first problem into a ``ConfigError(file, key, reason)``, reusing the config loader's
reasons so both files speak the same language. The compatibility levels and breaking-change
types are ObjectStack's (``kernel/plugin-versioning.zod.ts``).
"""

from __future__ import annotations

import difflib
import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    Strict,
    ValidationError,
    model_validator,
)
from pydantic_core import ErrorDetails

from osk_daemon.config.loader import _dotted, _read, _reason
from osk_daemon.errors import ConfigError
from osk_daemon.versioning.semver import Range, Version

__all__ = [
    "MANIFEST_FILE",
    "BreakingChange",
    "BreakingChangeType",
    "CompatibilityLevel",
    "Manifest",
    "Requirement",
    "load_manifest",
]

MANIFEST_FILE = "osk-plugin.toml"

_PLUGIN_RE = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
_SERVICE_RE = re.compile(r"^[a-z][a-z0-9_.-]{0,127}$")


class CompatibilityLevel(StrEnum):
    """How a version relates to an earlier one (ObjectStack ``CompatibilityLevelSchema``)."""

    FULLY_COMPATIBLE = "fully-compatible"
    BACKWARD_COMPATIBLE = "backward-compatible"
    DEPRECATED_COMPATIBLE = "deprecated-compatible"
    BREAKING_CHANGES = "breaking-changes"
    INCOMPATIBLE = "incompatible"


class BreakingChangeType(StrEnum):
    API_REMOVED = "api-removed"
    API_RENAMED = "api-renamed"
    BEHAVIOR_CHANGED = "behavior-changed"


def _to_version(value: Any) -> Any:
    return Version.parse(value) if isinstance(value, str) else value


def _to_range(value: Any) -> Any:
    return Range.parse(value) if isinstance(value, str) else value


def _check_plugin_name(value: str) -> str:
    if not _PLUGIN_RE.match(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-63 characters a-z, 0-9, '_' or '-', "
            "starting with a lowercase letter"
        )
    return value


def _check_service_name(value: str) -> str:
    if not _SERVICE_RE.match(value):
        raise ValueError(
            f"invalid service name {value!r}: use a-z, 0-9, '_', '-' or '.', "
            "starting with a lowercase letter"
        )
    return value


def _is_dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


def _check_callable(value: str) -> str:
    module, colon, attr = value.partition(":")
    if not colon or not _is_dotted(module) or not _is_dotted(attr):
        raise ValueError(f"expected 'module:function' with dotted Python names, got {value!r}")
    return value


SemVer = Annotated[Version, BeforeValidator(_to_version), PlainSerializer(str)]
VersionRange = Annotated[Range, BeforeValidator(_to_range), PlainSerializer(str)]
PluginName = Annotated[str, AfterValidator(_check_plugin_name)]
ServiceName = Annotated[str, AfterValidator(_check_service_name)]
CallableName = Annotated[str, AfterValidator(_check_callable)]

_MODEL = ConfigDict(frozen=True, extra="forbid", strict=True, arbitrary_types_allowed=True)


class Requirement(BaseModel):
    """A plugin (or a service some plugin provides) this version needs, with a range."""

    model_config = _MODEL

    name: ServiceName
    range: VersionRange = Field(default_factory=lambda: Range.parse("*"))
    optional: bool = False
    service: bool = False

    @model_validator(mode="after")
    def _check_plugin_names(self) -> Requirement:
        if not self.service:
            _check_plugin_name(self.name)
        return self


class BreakingChange(BaseModel):
    """A change that breaks callers of an earlier version, and how to get past it."""

    model_config = _MODEL

    type: Annotated[BreakingChangeType, Strict(False)]
    description: str = Field(min_length=1)
    migration_guide: str | None = None
    automated_migration: CallableName | None = None


class Manifest(BaseModel):
    """One version of one plugin, as its ``osk-plugin.toml`` declares it."""

    model_config = _MODEL

    name: PluginName
    version: SemVer
    entry: CallableName
    provides: dict[ServiceName, SemVer] = Field(default_factory=dict)
    requires: list[Requirement] = Field(default_factory=list)
    offline_capable: bool = False
    compatibility: dict[str, Annotated[CompatibilityLevel, Strict(False)]] = Field(
        default_factory=dict
    )
    breaking_changes: list[BreakingChange] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cross_checks(self) -> Manifest:
        seen: set[tuple[str, bool]] = set()
        for req in self.requires:
            if (req.name, req.service) in seen:
                raise ValueError(f"requires {req.name!r} more than once; merge the ranges")
            seen.add((req.name, req.service))
            if req.name == self.name and not req.service:
                raise ValueError(f"plugin {self.name!r} cannot require itself")
        for earlier in self.compatibility:
            try:
                other = Version.parse(earlier)
            except ValueError as exc:
                raise ValueError(f"compatibility: {exc}") from exc
            if not other < self.version:
                raise ValueError(
                    f"compatibility lists {earlier}, which is not earlier than {self.version}"
                )
        return self

    def compatibility_with(self, earlier: Version) -> CompatibilityLevel | None:
        """The declared level against ``earlier``, or None when the matrix does not say."""
        for text, level in self.compatibility.items():
            if Version.parse(text) == earlier:
                return level
        return None


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate the manifest at ``path`` (a file or the folder holding one).

    Raises ``ConfigError(file, key, reason)`` for the first problem: a missing or unreadable
    file, bad TOML, a bad value, an unknown key (with a close match suggested), a duplicate
    requirement or a compatibility entry that is not an earlier version. Cost: one file read.
    """
    target = Path(path)
    if target.is_dir():
        target = target / MANIFEST_FILE
    shown = str(target)
    raw = _read(target, shown)
    try:
        return Manifest.model_validate(raw)
    except ValidationError as exc:
        raise _translate(exc.errors()[0], shown) from exc


def _translate(error: ErrorDetails, shown: str) -> ConfigError:
    loc = tuple(part for part in error["loc"] if part != "[key]")
    if error["type"] == "extra_forbidden":
        word = str(loc[-1])
        close = difflib.get_close_matches(word, _fields_at(loc[:-1]), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        return ConfigError(shown, _dotted(loc), f"unknown key {word!r}{hint}")
    return ConfigError(shown, _dotted(loc), _reason(error, loc))


def _fields_at(loc: tuple[str | int, ...]) -> list[str]:
    models: dict[tuple[str, ...], type[BaseModel]] = {
        (): Manifest,
        ("requires",): Requirement,
        ("breaking_changes",): BreakingChange,
    }
    model = models.get(tuple(p for p in loc if isinstance(p, str)))
    return list(model.model_fields) if model is not None else []
