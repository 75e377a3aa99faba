"""From config to supervision tree: plugins expand into one leaf per instance.

In config a group's children are plugins or groups. The tree's leaves are instances
(``echo/0``, ``echo/1``): each is a process that restarts on its own, and a plugin's
instances sit in its group's child list where the plugin was named, in order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from osk_daemon.config import Config, PluginConfig
from osk_daemon.supervisor.backoff import BackoffPolicy
from osk_daemon.supervisor.instance import leaf_id
from osk_daemon.supervisor.tree import GroupSpec, LeafSpec, RestartType, Strategy, Tree


def leaf_spec(name: str, index: int, plugin: PluginConfig) -> LeafSpec:
    """The tree's view of one instance: its id, restart type and backoff."""
    b = plugin.backoff
    policy = BackoffPolicy(
        base=b.base, factor=b.factor, max=b.max, jitter=b.jitter, reset_after=b.reset_after
    )
    return LeafSpec(leaf_id(name, index), RestartType(plugin.restart), policy)


def build_tree(config: Config, indexes: Mapping[str, Sequence[int]] | None = None) -> Tree:
    """The tree of ``config``; a plugin's instances are numbered 0..n-1, or as
    ``indexes`` says (a restarted daemon keeps the numbers of the instances it adopts)."""

    def numbers(plugin: str) -> Sequence[int]:
        given = (indexes or {}).get(plugin)
        return given if given is not None else range(config.plugins[plugin].instances)

    leaves: dict[str, LeafSpec] = {}
    for name, plugin in config.plugins.items():
        for i in numbers(name):
            leaves[leaf_id(name, i)] = leaf_spec(name, i, plugin)
    groups: dict[str, GroupSpec] = {}
    for name, group in config.groups.items():
        children: list[str] = []
        for child in group.children:
            if child in config.plugins:
                children.extend(leaf_id(child, i) for i in numbers(child))
            else:
                children.append(child)
        groups[name] = GroupSpec(
            name, Strategy(group.strategy), group.intensity, group.period, tuple(children)
        )
    return Tree(groups, leaves, root="root")
