"""The spawn request's wire form and its attached fds (``supervisor.launch``), no processes."""

from __future__ import annotations

import pytest

from osk_daemon.supervisor.confinement import instance_cgroup
from osk_daemon.supervisor.launch import (
    SpawnRequest,
    request_fds,
    request_from_fds,
    request_to_wire,
)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("beat", "go", "fds"),
    [
        (None, None, [10, 11]),
        (12, None, [10, 11, 12]),
        (None, 13, [10, 11, 13]),
        (12, 13, [10, 11, 12, 13]),
    ],
)
def test_the_fds_travel_in_order_and_come_back_where_they_belong(
    beat: int | None, go: int | None, fds: list[int]
) -> None:
    req = SpawnRequest("m:f", stdout=10, stderr=11, beat=beat, go=go)
    assert request_fds(req) == fds
    back = request_from_fds(request_to_wire(req, env=None), fds)
    assert (back.stdout, back.stderr, back.beat, back.go) == (10, 11, beat, go)


@pytest.mark.parametrize("fds", [[10, 11], [10, 11, 12, 13, 14]])
def test_fds_that_do_not_match_the_flags_are_refused(fds: list[int]) -> None:
    wire = request_to_wire(SpawnRequest("m:f", beat=3, go=4), env=None)
    with pytest.raises(ValueError, match="comes with 4 fds"):
        request_from_fds(wire, fds)


def test_an_instance_has_two_cgroup_slots_that_no_other_instance_can_name() -> None:
    assert instance_cgroup("echo", 0) == "echo-0"
    assert instance_cgroup("echo", 0, 1) == "echo-0.1"
    # plugin names have no ".": a slot-1 name is never another instance's slot-0 name
    assert instance_cgroup("echo-0", 1) != instance_cgroup("echo", 0, 1)
