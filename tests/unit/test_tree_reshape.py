"""Adding and removing leaves of a running tree (what rollouts and reload do)."""

from __future__ import annotations

import pytest

from osk_daemon.supervisor.tree import LeafSpec, LeafState, RestartType, Strategy, TreeCommandError
from tests.unit.test_tree import EXACT, G, boot, build, starts, stops

pytestmark = pytest.mark.timeout(10)

S = LeafState
REST = Strategy.REST_FOR_ONE


def test_an_added_leaf_starts_on_request_and_takes_part_in_its_strategy() -> None:
    tree = boot(build(G("root", REST, "a", "b")))
    tree.add_leaf(LeafSpec("new", RestartType.PERMANENT, EXACT), "root", after="a")
    assert tree.topology.order == ("a", "new", "b")
    assert tree.leaf_state("new") is S.STOPPED
    assert starts(tree.start_children(["new"], 1.0)) == ["new"]
    tree.child_started("new", 1.0)
    # rest_for_one: the new leaf sits before b, so its crash restarts b too
    effects = tree.child_exited("new", True, 2.0, 0.0)
    assert stops(effects) == ["b"]


def test_a_stopped_leaf_can_be_removed_and_a_running_one_cannot() -> None:
    tree = boot(build(G("root", REST, "a", "b")))
    with pytest.raises(TreeCommandError, match="stop it before removing it"):
        tree.remove_leaf("a")
    effects = tree.stop(["a"], 1.0)
    assert stops(effects) == ["a"]
    tree.child_stopped("a", 1.5)
    tree.remove_leaf("a")
    assert tree.topology.order == ("b",)
    with pytest.raises(TreeCommandError, match="no leaf named 'a'"):
        tree.leaf_state("a")
    # b's crash no longer involves a
    assert stops(tree.child_exited("b", True, 2.0, 0.0)) == []


def test_bad_reshapes_are_refused() -> None:
    tree = boot(build(G("root", REST, "a")))
    spec = LeafSpec("x", RestartType.PERMANENT, EXACT)
    with pytest.raises(TreeCommandError, match="no group named 'nope'"):
        tree.add_leaf(spec, "nope")
    with pytest.raises(TreeCommandError, match="is not a child of group 'root'"):
        tree.add_leaf(spec, "root", after="zz")
    with pytest.raises(TreeCommandError, match="already in the tree"):
        tree.add_leaf(LeafSpec("a", RestartType.PERMANENT, EXACT), "root")
