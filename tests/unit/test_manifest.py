"""The plugin manifest: a full example, defaults, and one precise ConfigError per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from osk_daemon.errors import ConfigError
from osk_daemon.versioning import Range, Version
from osk_daemon.versioning.manifest import (
    MANIFEST_FILE,
    BreakingChangeType,
    CompatibilityLevel,
    Manifest,
    load_manifest,
)

pytestmark = pytest.mark.timeout(10)

FULL = """\
name = "echo"
version = "2.3.0"
entry = "echo.plugin:Echo"
offline_capable = true

[provides]
"echo.api" = "2.1.0"

[[requires]]
name = "store"
range = "^3.0"

[[requires]]
name = "metrics"
range = ">=1.2.0 <3 || 4.x"
optional = true

[[requires]]
name = "auth.tokens"
service = true

[compatibility]
"2.2.0" = "fully-compatible"
"2.0.0" = "deprecated-compatible"
"1.9.0" = "breaking-changes"

[[breaking_changes]]
type = "api-renamed"
description = "echo() is now say()"
migration_guide = "Rename calls to echo() into say()."
automated_migration = "echo.migrations:rename_echo"
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / MANIFEST_FILE
    path.write_text(text)
    return path


def test_full_manifest_loads_into_typed_values(tmp_path: Path) -> None:
    m = load_manifest(write(tmp_path, FULL))
    assert m.name == "echo"
    assert m.version == Version(2, 3, 0)
    assert m.entry == "echo.plugin:Echo"
    assert m.offline_capable
    assert m.provides == {"echo.api": Version(2, 1, 0)}
    store, metrics, tokens = m.requires
    assert (store.name, str(store.range), store.optional, store.service) == (
        "store",
        "^3.0",
        False,
        False,
    )
    assert store.range.contains(Version(3, 9, 1))
    assert metrics.optional
    assert metrics.range.contains(Version(4, 1, 0))
    assert tokens.service
    assert tokens.range.contains(Version(7, 0, 0))
    assert m.compatibility_with(Version(2, 2, 0)) is CompatibilityLevel.FULLY_COMPATIBLE
    assert m.compatibility_with(Version(1, 9, 0)) is CompatibilityLevel.BREAKING_CHANGES
    assert m.compatibility_with(Version(1, 0, 0)) is None
    (change,) = m.breaking_changes
    assert change.type is BreakingChangeType.API_RENAMED
    assert change.automated_migration == "echo.migrations:rename_echo"


def test_a_folder_means_its_manifest_file(tmp_path: Path) -> None:
    write(tmp_path, FULL)
    assert load_manifest(tmp_path).name == "echo"


def test_defaults_and_json_round_trip() -> None:
    m = Manifest.model_validate({"name": "store", "version": "3.1.0", "entry": "store:Store"})
    assert (m.provides, m.requires, m.offline_capable) == ({}, [], False)
    assert m.compatibility == {}
    assert m.breaking_changes == []
    dumped = m.model_dump(mode="json")
    assert dumped["version"] == "3.1.0"
    assert Manifest.model_validate({**dumped, "version": "3.1.0"}) == m


def test_ranges_in_requirements_serialize_as_written() -> None:
    m = Manifest.model_validate(
        {
            "name": "echo",
            "version": "1.0.0",
            "entry": "echo:Echo",
            "requires": [{"name": "store", "range": "~2.5"}],
        }
    )
    assert m.model_dump(mode="json")["requires"][0]["range"] == "~2.5"
    assert m.requires[0].range == Range.parse("~2.5")


BASE = 'name = "echo"\nversion = "2.3.0"\nentry = "echo:Echo"\n'


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ('version = "2.3.0"\nentry = "e:E"\n', "name", "required key is missing"),
        ('name = "Echo"\nversion = "1.0.0"\nentry = "e:E"\n', "name", "invalid name 'Echo'"),
        (
            'name = "echo"\nversion = "2.x"\nentry = "e:E"\n',
            "version",
            "invalid version '2.x': expected MAJOR.MINOR.PATCH",
        ),
        ('name = "echo"\nversion = 2\nentry = "e:E"\n', "version", "got 2"),
        (
            'name = "echo"\nversion = "1.0.0"\nentry = "echo"\n',
            "entry",
            "expected 'module:function'",
        ),
        (BASE + "offline = true\n", "offline", "unknown key 'offline'"),
        (BASE + "ofline_capable = true\n", "ofline_capable", "did you mean 'offline_capable'"),
        (BASE + 'offline_capable = "yes"\n', "offline_capable", "expected true or false"),
        (BASE + '[provides]\n"Echo API" = "1.0.0"\n', "provides.Echo API", "invalid service"),
        (BASE + '[provides]\n"echo.api" = "1.0"\n', "provides.echo.api", "invalid version"),
        (
            BASE + '[[requires]]\nname = "store"\nrange = "^3.0.0.0"\n',
            "requires[0].range",
            "invalid version range '^3.0.0.0': '^3.0.0.0' is not a version",
        ),
        (
            BASE + '[[requires]]\nname = "store"\nversion = "^3"\n',
            "requires[0].version",
            "did you mean 'service'|unknown key 'version'",
        ),
        (BASE + "[[requires]]\nrange = '^3'\n", "requires[0].name", "required key is missing"),
        (
            BASE + "[[requires]]\nname = 'store'\n[[requires]]\nname = 'store'\n",
            "",
            "requires 'store' more than once",
        ),
        (BASE + "[[requires]]\nname = 'echo'\n", "", "cannot require itself"),
        (
            BASE + '[compatibility]\n"2.2.0" = "mostly-fine"\n',
            "compatibility.2.2.0",
            "must be one of 'fully-compatible'",
        ),
        (BASE + '[compatibility]\n"2.4.0" = "incompatible"\n', "", "not earlier than 2.3.0"),
        (BASE + '[compatibility]\n"two" = "incompatible"\n', "", "compatibility: invalid version"),
        (
            BASE + "[[breaking_changes]]\ntype = 'api-moved'\ndescription = 'x'\n",
            "breaking_changes[0].type",
            "must be one of 'api-removed', 'api-renamed' or 'behavior-changed'",
        ),
        (
            BASE + "[[breaking_changes]]\ntype = 'api-removed'\ndescription = ''\n",
            "breaking_changes[0].description",
            "must not be empty",
        ),
        (
            BASE
            + "[[breaking_changes]]\ntype = 'api-removed'\ndescription = 'gone'\n"
            + "automated_migration = 'echo.migrations.run'\n",
            "breaking_changes[0].automated_migration",
            "expected 'module:function'",
        ),
        ("name = \n", "", "invalid TOML"),
    ],
)
def test_each_mistake_is_one_precise_config_error(
    tmp_path: Path, text: str, key: str, reason: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    error = info.value
    assert error.file == str(path)
    assert error.key == key
    assert any(part in error.reason for part in reason.split("|")), error.reason


def test_unknown_nested_key_suggests_the_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        BASE
        + "[[breaking_changes]]\ntype = 'api-removed'\ndescription = 'x'\nmigration_guid = 'x'\n",
    )
    with pytest.raises(ConfigError) as info:
        load_manifest(path)
    assert info.value.key == "breaking_changes[0].migration_guid"
    assert "did you mean 'migration_guide'" in info.value.reason


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_manifest(tmp_path / "nope" / MANIFEST_FILE)
