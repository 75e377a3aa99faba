"""Load a config file and its drop-ins, and turn every mistake into one precise ConfigError.

How it works:

1. Read the main file with ``tomllib``. Its ``include`` globs (relative to the file, each
   glob's matches sorted) name drop-ins, which are read the same way, depth first; a file
   that includes itself or an ancestor is an include cycle.
2. Before merging, relative paths a file defines (``daemon.runtime_dir``,
   ``daemon.control_socket``, ``daemon.state_dir``, ``daemon.plugins_dir``,
   ``plugins.*.path``) are made absolute against *that* file's directory, so a drop-in
   can ship its own plugin directory next to it.
3. Deep-merge: tables merge key by key, anything else (numbers, strings, arrays) is
   replaced. ``_Origins`` remembers which file wrote each key (a table: the file that
   created it), so an error points at the drop-in that holds the bad value.
4. Validate the merged dict with the pydantic models; the first error's ``loc`` becomes the
   dotted key and its type a short human reason (``must be > 0, got -1``).
5. Cross-table rules the models cannot see: names shared by a plugin and a group, unknown
   children, a child in two groups, cycles; without ``daemon.plugins_dir``, every plugin's
   ``entry`` and an exact ``version``. Then ``groups.root`` is completed with every
   plugin and group no group lists. (Choosing versions from ``plugins_dir`` is
   ``versioning.planning``'s job: it reads manifests, this module reads only config files.)
"""

from __future__ import annotations

import copy
import difflib
import os
import tomllib
from collections.abc import Iterable
from pathlib import Path
from typing import Any, get_args, get_origin

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from osk_daemon.config.models import Config, ConfigFile, GroupConfig
from osk_daemon.errors import ConfigError

__all__ = ["ROOT_GROUP", "load_config"]

ROOT_GROUP = "root"

Loc = tuple[str | int, ...]


def load_config(path: str | Path) -> Config:
    """Read, merge and validate the config at ``path`` and its drop-ins.

    Raises ``ConfigError(file, key, reason)`` for the first problem found: a missing or
    unreadable file, bad TOML (with line and column), a bad value or unknown key, or a broken
    group tree. ``file`` is the path as given (drop-ins: joined to the including file's
    directory as given). Cost: one read per file; no other I/O (plugin paths are not checked).
    """
    shown = str(path)
    main = Path(path)
    merged: dict[str, Any] = {}
    origins = _Origins(default=shown)
    _load_tree(main, shown, (), merged, origins)
    try:
        tables = ConfigFile.model_validate(merged)
    except ValidationError as exc:
        raise _translate(exc.errors()[0], origins) from exc
    _check_groups(tables, origins)
    _check_plugins(tables, origins)
    return Config(
        daemon=tables.daemon,
        metrics=tables.metrics,
        tracing=tables.tracing,
        plugins=tables.plugins,
        groups=_with_root(tables),
        source=main.absolute(),
    )


class _Origins:
    """Which file wrote each key: leaves remember the last writer, tables their creator."""

    def __init__(self, default: str) -> None:
        self._default = default
        self._by_loc: dict[Loc, str] = {}

    def record(self, loc: Loc, value: Any, file: str) -> None:
        self._by_loc[loc] = file
        if isinstance(value, dict):
            for key, child in value.items():
                self.record((*loc, key), child, file)

    def forget(self, loc: Loc) -> None:
        for known in [k for k in self._by_loc if k[: len(loc)] == loc]:
            del self._by_loc[known]

    def file_of(self, loc: Loc) -> str:
        for n in range(len(loc), 0, -1):
            file = self._by_loc.get(loc[:n])
            if file is not None:
                return file
        return self._default


def _load_tree(
    path: Path, shown: str, stack: tuple[Path, ...], merged: dict[str, Any], origins: _Origins
) -> None:
    real = path.resolve()
    raw = _read(path, shown)
    includes = raw.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(p, str) for p in includes):
        raise ConfigError(
            shown, "include", f"expected an array of glob strings, got {_show(includes)}"
        )
    _absolutize(raw, path.absolute().parent)
    _merge(merged, raw, (), shown, origins)
    for index, pattern in enumerate(includes):
        matches = _glob(path.parent, pattern)
        if not matches and not any(c in pattern for c in "*?["):
            raise ConfigError(shown, f"include[{index}]", f"no such file: {pattern!r}")
        for match in matches:
            if match.resolve() in (*stack, real):
                chain = " -> ".join(str(p) for p in (*stack, real, match.resolve()))
                raise ConfigError(shown, f"include[{index}]", f"include cycle: {chain}")
            _load_tree(match, str(match), (*stack, real), merged, origins)


def _read(path: Path, shown: str) -> dict[str, Any]:
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(shown, "", "no such file") from exc
    except IsADirectoryError as exc:
        raise ConfigError(shown, "", "is a directory, expected a TOML file") from exc
    except OSError as exc:
        raise ConfigError(shown, "", f"cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(shown, "", f"not valid UTF-8 (byte {exc.start})") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(shown, "", f"invalid TOML: {exc}") from exc


def _glob(base: Path, pattern: str) -> list[Path]:
    target = Path(pattern)
    if target.is_absolute():
        base, pattern = Path(target.anchor), str(target.relative_to(target.anchor))
    return sorted(p for p in base.glob(pattern) if p.is_file())


def _absolutize(raw: dict[str, Any], base: Path) -> None:
    def resolve(value: Any) -> Any:
        if isinstance(value, str):
            return Path(os.path.normpath(base / value))
        return value

    daemon = raw.get("daemon")
    if isinstance(daemon, dict):
        for key in ("runtime_dir", "control_socket", "state_dir", "plugins_dir"):
            if key in daemon:
                daemon[key] = resolve(daemon[key])
    tracing = raw.get("tracing")
    if isinstance(tracing, dict) and "file" in tracing:
        tracing["file"] = resolve(tracing["file"])
    plugins = raw.get("plugins")
    if isinstance(plugins, dict):
        for plugin in plugins.values():
            if not isinstance(plugin, dict):
                continue
            if isinstance(plugin.get("path"), list):
                plugin["path"] = [resolve(p) for p in plugin["path"]]
            sandbox = plugin.get("sandbox")
            fs = sandbox.get("filesystem") if isinstance(sandbox, dict) else None
            if isinstance(fs, dict):
                for key in ("read", "write"):
                    if isinstance(fs.get(key), list):
                        fs[key] = [resolve(p) for p in fs[key]]


def _merge(
    dst: dict[str, Any], src: dict[str, Any], loc: Loc, file: str, origins: _Origins
) -> None:
    for key, value in src.items():
        here = (*loc, key)
        current = dst.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _merge(current, value, here, file, origins)
        else:
            origins.forget(here)
            dst[key] = copy.deepcopy(value)
            origins.record(here, value, file)


# -- pydantic errors -> ConfigError -----------------------------------------------------------

_EXPECTED = {
    "float_type": "a number",
    "float_parsing": "a number",
    "finite_number": "a finite number",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "string_type": "a string",
    "list_type": "an array",
    "dict_type": "a table",
    "model_type": "a table",
    "model_attributes_type": "a table",
    "path_type": "a path string",
}
_BOUNDS = {
    "greater_than": ("gt", ">"),
    "greater_than_equal": ("ge", ">="),
    "less_than": ("lt", "<"),
    "less_than_equal": ("le", "<="),
}


def _translate(error: ErrorDetails, origins: _Origins) -> ConfigError:
    loc: Loc = tuple(part for part in error["loc"] if part != "[key]")
    return ConfigError(origins.file_of(loc), _dotted(loc), _reason(error, loc))


def _reason(error: ErrorDetails, loc: Loc) -> str:
    kind, ctx, got = error["type"], error.get("ctx") or {}, _show(error.get("input"))
    if kind == "extra_forbidden":
        return f"unknown key {loc[-1]!r}{_did_you_mean(str(loc[-1]), _fields_at(loc[:-1]))}"
    if kind == "missing":
        return "required key is missing"
    if kind in _EXPECTED:
        return f"expected {_EXPECTED[kind]}, got {got}"
    if kind in _BOUNDS:
        name, op = _BOUNDS[kind]
        bound = ctx.get(name)
        if isinstance(bound, float) and bound.is_integer():
            bound = int(bound)
        return f"must be {op} {_show(bound)}, got {got}"
    if kind in ("enum", "literal_error"):
        return f"must be one of {ctx.get('expected')}, got {got}"
    if kind == "string_too_short":
        return "must not be empty"
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    return f"{error['msg']}, got {got}"


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return "a table"
    text = repr(str(value)) if isinstance(value, Path) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _fields_at(loc: Loc) -> list[str]:
    node: Any = ConfigFile
    for part in loc:
        if isinstance(node, type) and issubclass(node, BaseModel):
            field = node.model_fields.get(str(part))
            if field is None:
                return []
            node = field.annotation
        elif get_origin(node) is dict:
            node = get_args(node)[1]
        else:
            return []
    if isinstance(node, type) and issubclass(node, BaseModel):
        return list(node.model_fields)
    return []


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


# -- plugins without an installed copy ---------------------------------------------------------


def _check_plugins(tables: ConfigFile, origins: _Origins) -> None:
    """Without ``daemon.plugins_dir`` every plugin names its code and one exact version.
    (With it, ``versioning.planning`` decides which plugins are installed there.)"""
    if tables.daemon.plugins_dir is not None:
        return
    for name, plugin in tables.plugins.items():
        if plugin.entry is None:
            loc: Loc = ("plugins", name, "entry")
            raise ConfigError(origins.file_of(loc), _dotted(loc), "required key is missing")
        if not plugin.exact_version:
            loc = ("plugins", name, "version")
            raise ConfigError(
                origins.file_of(loc),
                _dotted(loc),
                f"{plugin.version!r} is a range; ranges choose among installed versions, "
                "so set daemon.plugins_dir or give an exact version",
            )


# -- the group tree -----------------------------------------------------------------------------


def _check_groups(tables: ConfigFile, origins: _Origins) -> None:
    plugins, groups = tables.plugins, tables.groups

    def fail(loc: Loc, reason: str) -> ConfigError:
        return ConfigError(origins.file_of(loc), _dotted(loc), reason)

    for name in groups:
        if name in plugins:
            raise fail(("groups", name), f"name {name!r} is used by both a plugin and a group")
    parent: dict[str, str] = {}
    for group_name, group in groups.items():
        for index, child in enumerate(group.children):
            loc = ("groups", group_name, "children", index)
            if child not in plugins and child not in groups:
                hint = _did_you_mean(child, [*plugins, *groups])
                raise fail(loc, f"unknown child {child!r}: no plugin or group has that name{hint}")
            if child == ROOT_GROUP:
                raise fail(loc, "'root' is the top of the tree and cannot be a child")
            kind = "plugin" if child in plugins else "group"
            if parent.get(child) == group_name:
                raise fail(loc, f"{kind} {child!r} is listed twice")
            if child in parent:
                raise fail(loc, f"{kind} {child!r} is already a child of group {parent[child]!r}")
            parent[child] = group_name
    # Each node has one parent now, so a cycle is a chain of parents that returns to its start.
    for start in groups:
        chain, node = [start], start
        while node in parent:
            node = parent[node]
            if node == start:
                path = " -> ".join([start, *reversed(chain[1:]), start])
                raise fail(("groups", start, "children"), f"groups form a cycle: {path}")
            if node in chain:
                break
            chain.append(node)


def _with_root(tables: ConfigFile) -> dict[str, GroupConfig]:
    listed = {child for group in tables.groups.values() for child in group.children}
    orphans = [n for n in (*tables.plugins, *tables.groups) if n not in listed and n != ROOT_GROUP]
    root = tables.groups.get(ROOT_GROUP)
    if root is None:
        return {**tables.groups, ROOT_GROUP: GroupConfig(children=orphans)}
    completed = root.model_copy(update={"children": [*root.children, *orphans]})
    return {name: completed if name == ROOT_GROUP else g for name, g in tables.groups.items()}
