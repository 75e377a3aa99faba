"""The launch plan: per-level defaults, wire round trip, levels as supersets, check_plan."""

from __future__ import annotations

import sys
from typing import Any

import pytest

from osk_daemon.isolation.plan import (
    KernelFeatures,
    LaunchPlan,
    SandboxError,
    SandboxLevel,
    check_plan,
    default_read_paths,
    plan_for_level,
)
from osk_daemon.isolation.rlimits import INFINITY, clamp

FACTS: dict[str, Any] = {
    "cgroup_procs": ("/sys/fs/cgroup/pids/osk/p-0/cgroup.procs",),
    "rlimits": (("NOFILE", 64, 64),),
    "parent_pid": 42,
    "uid": 65534,
    "gid": 65534,
    "read_paths": ("/usr", "/code"),
    "state_dir": "/state",
    "write_paths": ("/shared",),
}

# level -> fields the plan must have (everything else: the LaunchPlan default)
EXPECTED: dict[SandboxLevel, dict[str, Any]] = {
    SandboxLevel.NONE: {},
    SandboxLevel.MINIMAL: {"parent_pid": 42},
    SandboxLevel.STANDARD: {
        "parent_pid": 42,
        "uid": 65534,
        "gid": 65534,
        "read_paths": ("/usr", "/code"),
        "write_paths": ("/state", "/shared"),
    },
    SandboxLevel.STRICT: {
        "parent_pid": 42,
        "uid": 65534,
        "gid": 65534,
        "read_paths": ("/usr", "/code"),
        "write_paths": ("/state", "/shared"),
        "network": False,
        "seccomp": "deny",
    },
    SandboxLevel.PARANOID: {
        "parent_pid": 42,
        "uid": 65534,
        "gid": 65534,
        "read_paths": ("/usr", "/code", "/shared"),  # read-only everything but the state dir
        "write_paths": ("/state",),
        "network": False,
        "seccomp": "allow",
        "user_namespace": True,
    },
}

ALL = KernelFeatures(7, True, True, True, True, True)
NOTHING = KernelFeatures(0, False, False, False, False, False)


@pytest.mark.parametrize("level", list(SandboxLevel))
def test_plan_for_level_fills_defaults(level: SandboxLevel) -> None:
    plan = plan_for_level(level, **FACTS)
    want = LaunchPlan(
        level=level,
        cgroup_procs=FACTS["cgroup_procs"],
        rlimits=FACTS["rlimits"],
        **EXPECTED[level],
    )
    assert plan == want


@pytest.mark.parametrize("level", [SandboxLevel.STRICT, SandboxLevel.PARANOID])
def test_network_grant_keeps_the_network(level: SandboxLevel) -> None:
    plan = plan_for_level(level, network_granted=True)
    assert plan.network is True
    assert "net_namespace" not in plan.steps()


@pytest.mark.parametrize("level", list(SandboxLevel))
@pytest.mark.parametrize("require", [True, False])
def test_wire_round_trip(level: SandboxLevel, require: bool) -> None:
    plan = plan_for_level(level, require=require, **FACTS)
    wire = plan.to_wire()
    assert all(not isinstance(v, tuple) for v in wire.values())
    assert LaunchPlan.from_wire(wire) == plan


@pytest.mark.parametrize(
    "patch",
    [
        {"v": 2},
        {"level": "lax"},
        {"rlimits": [["BOGUS", 1, 1]]},
        {"rlimits": [["NOFILE", 9, 3]]},
        {"rlimits": [["NOFILE", True, 3]]},
        {"uid": -1},
        {"read_paths": "/usr"},
        {"network": 1},
        {"seccomp": "maybe"},
        {"extra": 1},
    ],
)
def test_from_wire_rejects_malformed(patch: dict[str, Any]) -> None:
    wire = {**plan_for_level(SandboxLevel.STANDARD, **FACTS).to_wire(), **patch}
    with pytest.raises(SandboxError) as info:
        LaunchPlan.from_wire(wire)
    assert info.value.code == "sandbox"


def test_each_level_is_a_superset_of_the_one_before() -> None:
    levels = list(SandboxLevel)
    steps = [plan_for_level(level, **FACTS).steps() for level in levels]
    for lower, higher, name in zip(steps, steps[1:], levels[1:], strict=False):
        assert lower < higher, f"{name} adds nothing or drops something"


def test_default_read_paths_has_system_python_and_extra() -> None:
    paths = default_read_paths(["/code/plugin", "/usr"])
    assert paths[0] == "/usr"
    assert paths.count("/usr") == 1
    assert paths[-1] == "/code/plugin"
    assert "/proc" in paths
    assert "/dev/null" in paths
    assert "/etc/hostname" not in paths
    assert sys.prefix in paths
    assert sys.base_prefix in paths


@pytest.mark.parametrize("level", list(SandboxLevel))
def test_check_plan_with_every_feature_is_empty(level: SandboxLevel) -> None:
    assert check_plan(plan_for_level(level, **FACTS), ALL) == []


@pytest.mark.parametrize(
    ("level", "missing"),
    [
        (SandboxLevel.NONE, []),
        (SandboxLevel.MINIMAL, ["no_new_privs"]),
        (SandboxLevel.STANDARD, ["no_new_privs", "landlock"]),
        (SandboxLevel.STRICT, ["no_new_privs", "landlock", "net_namespace", "seccomp"]),
        (
            SandboxLevel.PARANOID,
            ["no_new_privs", "landlock", "net_namespace", "user_namespace", "seccomp"],
        ),
    ],
)
def test_check_plan_names_missing_features(level: SandboxLevel, missing: list[str]) -> None:
    got = check_plan(plan_for_level(level, **FACTS), NOTHING)
    assert [line.split(":", 1)[0] for line in got] == missing


def test_check_plan_wants_libseccomp() -> None:
    features = KernelFeatures(7, True, False, True, True, True)
    got = check_plan(plan_for_level(SandboxLevel.STRICT), features)
    assert len(got) == 1
    assert "libseccomp" in got[0]


@pytest.mark.parametrize(
    ("soft", "hard", "current", "want"),
    [
        (10, 20, 100, (10, 20)),
        (10, 200, 100, (10, 100)),
        (150, 200, 100, (100, 100)),
        (-1, -1, 100, (100, 100)),
        (-1, -1, INFINITY, (INFINITY, INFINITY)),
        (5, -1, INFINITY, (5, INFINITY)),
    ],
)
def test_rlimit_clamp_only_lowers(
    soft: int, hard: int, current: int, want: tuple[int, int]
) -> None:
    assert clamp(soft, hard, current) == want
