"""From a loaded config to what the daemon runs: chosen versions, code folders, start order.

Theory of operation
-------------------
A config names plugins in two ways. An *installed* plugin has versions under
``daemon.plugins_dir`` (see ``installed``); the config asks for a range (``version =
"^2.1"``, default ``*``) and the manifest of the chosen version supplies the entry and the
code folder. A *config-only* plugin names its ``entry`` (and ``path``) itself and has one
exact version (default ``0.0.0``); it takes part in resolution as a version that needs
nothing, so a manifest may still require it.

``plan_start`` builds the resolver's catalogue from both, resolves, and returns a
``StartPlan``:

- ``config``: the same config with every plugin pinned (exact ``version``, ``entry`` and
  ``path`` of the chosen folder). Plugins that only others need are *pulled in* with
  default settings and added to the root group. Within every group the children are
  reordered, stably, so that what a child needs starts before it: the tree's start order
  (and rest_for_one's "the rest") then follows the dependencies, and its reverse stop order
  stops dependents first. Where groups need each other both ways no order satisfies both;
  that group keeps the config's order and ``warnings`` says so (the start gate in the
  supervisor still holds each plugin until its requirements are up).
- ``requires``/``optional``: per plugin, the plugins it needs (hard) or uses if present.
- ``waves``: the parallel start waves (for ``oskctl graph`` and logs).

Every failure is a ``ConfigError`` naming the config file and the key: a resolution
conflict carries the resolver's explanation as its reason.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from osk_daemon.config import Config, GroupConfig, PluginConfig
from osk_daemon.errors import ConfigError
from osk_daemon.versioning.installed import Installed, scan
from osk_daemon.versioning.manifest import Requirement
from osk_daemon.versioning.provider import Declares
from osk_daemon.versioning.resolver import ResolutionFailed, resolve, start_order
from osk_daemon.versioning.semver import Range, Version

__all__ = ["StartPlan", "plan_start"]

_DEFAULT_VERSION = "0.0.0"


@dataclass(frozen=True)
class _Bare:
    """A config-only plugin's one version, as the resolver sees it: it needs nothing."""

    requires: Sequence[Requirement] = ()
    provides: Mapping[str, Version] = field(default_factory=dict)


@dataclass(frozen=True)
class StartPlan:
    config: Config
    requires: Mapping[str, frozenset[str]]
    optional: Mapping[str, frozenset[str]]
    waves: list[list[str]]
    offline_capable: frozenset[str] = frozenset()
    installed: Mapping[str, Installed] = field(default_factory=dict)
    pulled_in: tuple[str, ...] = ()
    warnings: tuple[str, ...] = ()
    ranges: Mapping[str, str] = field(default_factory=dict)  # what the config asked for

    def wave_of(self, plugin: str) -> int:
        for index, wave in enumerate(self.waves):
            if plugin in wave:
                return index
        raise KeyError(plugin)


def plan_start(config: Config) -> StartPlan:
    """Pick every plugin's version and code, and the order to start them in.

    Raises ``ConfigError``: a bad plugins directory or manifest (that file), a config-only
    plugin without ``entry`` or with a range for ``version``, ``entry``/``path`` set for an
    installed plugin, or a resolution conflict explained in words. Cost: one read per
    manifest plus the resolver (milliseconds for hundreds of plugins).
    """
    source = str(config.source)
    plugins_dir = config.daemon.plugins_dir
    installed = scan(plugins_dir) if plugins_dir is not None else {}
    catalogue: dict[str, dict[Version, Declares]] = {
        name: {v: inst.manifest for v, inst in versions.items()}
        for name, versions in installed.items()
    }
    roots: dict[str, Range] = {}
    for name, pcfg in config.plugins.items():
        roots[name] = _root_range(source, name, pcfg, name in installed, plugins_dir)
        if name not in installed:
            catalogue[name] = {Version.parse(pcfg.version or _DEFAULT_VERSION): _Bare()}
    try:
        resolution = resolve(catalogue, roots)
    except ResolutionFailed as exc:
        conflict = exc.conflict
        named = [p.plugin for p in conflict.plugins if p.plugin in config.plugins]
        key = f"plugins.{named[0]}.version" if named else "plugins"
        raise ConfigError(source, key, f"{conflict.type}: {conflict.description}") from exc
    chosen = {
        name: installed[name][v] for name, v in resolution.versions.items() if name in installed
    }
    plugins: dict[str, PluginConfig] = {}
    pulled_in = tuple(sorted(set(resolution.versions) - set(config.plugins)))
    for name in [*config.plugins, *pulled_in]:
        base = config.plugins.get(name, PluginConfig())
        version = str(resolution.versions[name])
        if name in chosen:
            inst = chosen[name]
            plugins[name] = base.model_copy(
                update={"entry": inst.manifest.entry, "path": [inst.folder], "version": version}
            )
        else:
            plugins[name] = base.model_copy(update={"version": version})
    edges = {
        p: resolution.requires.get(p, frozenset()) | resolution.optional.get(p, frozenset())
        for p in resolution.versions
    }
    groups = dict(config.groups)
    if pulled_in:
        root = groups["root"]
        groups["root"] = root.model_copy(update={"children": [*root.children, *pulled_in]})
    groups, warnings = _order_children(groups, set(plugins), edges)
    return StartPlan(
        config=config.model_copy(update={"plugins": plugins, "groups": groups}),
        requires={p: resolution.requires.get(p, frozenset()) for p in plugins},
        optional={p: resolution.optional.get(p, frozenset()) for p in plugins},
        waves=start_order(resolution),
        offline_capable=frozenset(n for n, i in chosen.items() if i.manifest.offline_capable),
        installed=chosen,
        pulled_in=pulled_in,
        warnings=tuple(warnings),
        ranges={name: str(rng) for name, rng in roots.items()},
    )


def _root_range(
    source: str, name: str, pcfg: PluginConfig, is_installed: bool, plugins_dir: Path | None
) -> Range:
    if is_installed:
        for key in ("entry", "path"):
            if getattr(pcfg, key):
                raise ConfigError(
                    source,
                    f"plugins.{name}.{key}",
                    f"'{name}' is installed in {plugins_dir}, whose manifests give its entry "
                    "and code; remove this key (or the installed copy)",
                )
        return Range.parse(pcfg.version or "*")
    if pcfg.entry is None:
        where = f"; no osk-plugin.toml for '{name}' in {plugins_dir}" if plugins_dir else ""
        raise ConfigError(source, f"plugins.{name}.entry", f"required key is missing{where}")
    if not pcfg.exact_version:
        raise ConfigError(
            source,
            f"plugins.{name}.version",
            f"{pcfg.version!r} is a range, but '{name}' is not installed in daemon.plugins_dir "
            "to choose from; give an exact version",
        )
    return Range.parse(pcfg.version or _DEFAULT_VERSION)


def _order_children(
    groups: Mapping[str, GroupConfig], plugins: set[str], edges: Mapping[str, frozenset[str]]
) -> tuple[dict[str, GroupConfig], list[str]]:
    """Reorder each group's children so that what a child's plugins need comes first."""
    leaves: dict[str, frozenset[str]] = {}

    def under(node: str) -> frozenset[str]:
        if node not in leaves:
            if node in plugins:
                leaves[node] = frozenset({node})
            else:
                leaves[node] = frozenset().union(*(under(c) for c in groups[node].children))
        return leaves[node]

    out: dict[str, GroupConfig] = {}
    warnings: list[str] = []
    for gid, group in groups.items():
        kids = list(group.children)
        needs = {
            kid: {
                other
                for other in kids
                if other != kid
                and any(edges.get(p, frozenset()) & under(other) for p in under(kid))
            }
            for kid in kids
        }
        order: list[str] = []
        left = list(kids)
        while left:
            ready = [k for k in left if not needs[k].intersection(left)]
            if not ready:
                warnings.append(
                    f"groups.{gid}: children {', '.join(left)} need each other across groups; "
                    "kept in config order"
                )
                order.extend(left)
                break
            order.append(ready[0])
            left.remove(ready[0])
        out[gid] = group if order == kids else group.model_copy(update={"children": order})
    return out, warnings
