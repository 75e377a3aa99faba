"""The plugins directory: every installed version of every plugin, side by side.

Layout (``daemon.plugins_dir``)::

    plugins/
      store/
        2.5.1/osk-plugin.toml   + the code of store 2.5.1
        3.1.0/osk-plugin.toml   + the code of store 3.1.0
      echo/
        2.3.0/osk-plugin.toml

Each version lives in its own folder with its manifest; the folder is put first on the
instance's ``sys.path``, so an instance imports exactly its version's code, and two
versions of one plugin can run at the same time (each in its own processes). The folder
names are for people: the manifest's ``name`` and ``version`` are what counts. A manifest
directly under ``plugins_dir/<folder>/`` (one version, no version folder) is accepted too.

``scan`` reads every manifest once. Two folders claiming the same name and version, or a
manifest that does not validate, are errors naming the file: a broken install must not
silently fall back to another version.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from osk_daemon.errors import ConfigError
from osk_daemon.versioning.manifest import MANIFEST_FILE, Manifest, load_manifest
from osk_daemon.versioning.semver import Version

__all__ = ["Installed", "InstalledPlugins", "scan"]


@dataclass(frozen=True)
class Installed:
    """One installed plugin version: what its manifest says and where its code is."""

    manifest: Manifest
    folder: Path

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> Version:
        return self.manifest.version


# plugin name -> version -> its install
InstalledPlugins = Mapping[str, Mapping[Version, Installed]]


def scan(plugins_dir: Path) -> dict[str, dict[Version, Installed]]:
    """Every manifest at ``plugins_dir/*/osk-plugin.toml`` or ``plugins_dir/*/*/osk-plugin.toml``.

    Raises ``ConfigError`` for a missing or unreadable directory, an invalid manifest (its
    file, key and reason) or a name and version installed twice. Cost: one directory
    listing per plugin folder and one read per manifest.
    """
    try:
        folders = sorted(p for p in plugins_dir.iterdir() if p.is_dir())
    except FileNotFoundError as exc:
        raise ConfigError(str(plugins_dir), "", "plugins_dir: no such directory") from exc
    except OSError as exc:
        raise ConfigError(str(plugins_dir), "", f"plugins_dir: cannot list: {exc}") from exc
    found: dict[str, dict[Version, Installed]] = {}
    for folder in folders:
        candidates = [folder] if (folder / MANIFEST_FILE).is_file() else []
        candidates += sorted(
            sub for sub in folder.iterdir() if sub.is_dir() and (sub / MANIFEST_FILE).is_file()
        )
        for where in candidates:
            manifest = load_manifest(where)
            versions = found.setdefault(manifest.name, {})
            twin = versions.get(manifest.version)
            if twin is not None:
                raise ConfigError(
                    str(where / MANIFEST_FILE),
                    "version",
                    f"{manifest.name} {manifest.version} is installed twice: here and in "
                    f"{twin.folder}; remove one",
                )
            versions[manifest.version] = Installed(manifest, where)
    return found
