"""Plugin versions: SemVer 2.0.0 with npm ranges, the `osk-plugin.toml` manifest, the resolver.

``Version`` and ``Range`` are pure values (npm's rules, checked against npm's fixtures).
``load_manifest`` validates what a plugin version declares about itself; ``resolve`` picks
one version per plugin from a catalogue of them and explains conflicts; ``start_order``
turns the result into parallel start waves.
"""

from osk_daemon.versioning.manifest import (
    MANIFEST_FILE,
    BreakingChange,
    BreakingChangeType,
    CompatibilityLevel,
    Manifest,
    Requirement,
    load_manifest,
)
from osk_daemon.versioning.resolver import (
    Conflict,
    ConflictParty,
    ConflictType,
    Resolution,
    ResolutionFailed,
    resolve,
    start_order,
)
from osk_daemon.versioning.semver import Comparator, InvalidRange, InvalidVersion, Range, Version

__all__ = [
    "MANIFEST_FILE",
    "BreakingChange",
    "BreakingChangeType",
    "Comparator",
    "CompatibilityLevel",
    "Conflict",
    "ConflictParty",
    "ConflictType",
    "InvalidRange",
    "InvalidVersion",
    "Manifest",
    "Range",
    "Requirement",
    "Resolution",
    "ResolutionFailed",
    "Version",
    "load_manifest",
    "resolve",
    "start_order",
]
