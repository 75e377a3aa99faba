"""What changed between the running config and a newly loaded one, for ``reload``.

Both configs are already planned (versions pinned, code folders chosen), so a plugin whose
range now resolves to a newer installed version shows as a changed ``version`` (the reload
passes, as the new config, only what the file's edit changed: ``supervisor.reload``). Per plugin
the diff lists the changed keys as dotted paths (``health_check.interval``); the reload
decides what each means:

- ``added`` plugins start, ``removed`` ones stop (dependents first), ``unchanged`` ones keep
  their processes and pids;
- a plugin whose ``version``, ``entry``, ``path``, ``config``, ``env``, ``limits`` or
  ``sandbox`` changed needs new processes: it is swapped without downtime (``swap``);
- ``instances`` alone scales; supervision settings alone (health_check, backoff, restart,
  timeouts) apply in place (``retune``);
- ``daemon`` keys that cannot change under a running daemon (sockets, directories) are
  listed in ``daemon_restart``; the reload refuses them with that list rather than pretend.
- a change of the group tree is reported in ``groups``.

Pure: compares two models, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel

from osk_daemon.config.models import Config

__all__ = ["ConfigDiff", "diff_configs", "top_keys"]

SWAP_KEYS = frozenset({"version", "entry", "path", "config", "env", "limits", "sandbox", "spawn"})
SCALE_KEYS = frozenset({"instances"})
RESTART_DAEMON_KEYS = frozenset(
    {"runtime_dir", "control_socket", "state_dir", "cgroups", "plugins_dir", "max_message_size"}
)


@dataclass(frozen=True)
class ConfigDiff:
    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    changed: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    unchanged: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    daemon: tuple[str, ...] = ()

    @property
    def swap(self) -> tuple[str, ...]:
        """Changed plugins that need new processes."""
        return tuple(p for p, keys in self.changed.items() if top_keys(keys) & SWAP_KEYS)

    @property
    def scale(self) -> tuple[str, ...]:
        return tuple(
            p
            for p, keys in self.changed.items()
            if p not in self.swap and top_keys(keys) & SCALE_KEYS
        )

    @property
    def retune(self) -> tuple[str, ...]:
        return tuple(p for p in self.changed if p not in self.swap and p not in self.scale)

    @property
    def daemon_restart(self) -> tuple[str, ...]:
        return tuple(k for k in self.daemon if k.split(".")[0] in RESTART_DAEMON_KEYS)

    @property
    def empty(self) -> bool:
        return not (self.added or self.removed or self.changed or self.groups or self.daemon)

    def summary(self) -> dict[str, Any]:
        """What ``oskctl reload`` prints."""
        return {
            "added": list(self.added),
            "removed": list(self.removed),
            "swapped": list(self.swap),
            "scaled": list(self.scale),
            "retuned": list(self.retune),
            "unchanged": list(self.unchanged),
            "changed_keys": {p: list(k) for p, k in self.changed.items()},
            "groups": list(self.groups),
            "daemon": list(self.daemon),
        }


def top_keys(keys: tuple[str, ...]) -> set[str]:
    """The top-level keys of dotted paths (``health_check.interval`` -> ``health_check``)."""
    return {k.split(".")[0] for k in keys}


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, BaseModel) and isinstance(new, BaseModel) and type(old) is type(new):
        out: list[str] = []
        for name in type(old).model_fields:
            out += _changed_keys(getattr(old, name), getattr(new, name), f"{prefix}{name}.")
        return out
    return [] if old == new else [prefix.rstrip(".")]


def diff_configs(old: Config, new: Config) -> ConfigDiff:
    """Compare two planned configs. Cost O(size of the configs)."""
    changed = {}
    unchanged = []
    for name in new.plugins:
        if name not in old.plugins:
            continue
        keys = _changed_keys(old.plugins[name], new.plugins[name])
        if keys:
            changed[name] = tuple(keys)
        else:
            unchanged.append(name)
    groups = sorted(
        g for g in set(old.groups) | set(new.groups) if old.groups.get(g) != new.groups.get(g)
    )
    return ConfigDiff(
        added=tuple(p for p in new.plugins if p not in old.plugins),
        removed=tuple(p for p in old.plugins if p not in new.plugins),
        changed=changed,
        unchanged=tuple(unchanged),
        groups=tuple(groups),
        daemon=tuple(_changed_keys(old.daemon, new.daemon)),
    )
