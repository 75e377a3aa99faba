"""``cgroups.cpu_max``: cores to a CFS quota and period the kernel accepts."""

from __future__ import annotations

import pytest

from osk_daemon.isolation.cgroups import MAX_CPU_PERIOD_US, MIN_CPU_QUOTA_US, cpu_max

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("cores", "expected"),
    [
        (1.5, (150_000, 100_000)),
        (0.2, (20_000, 100_000)),
        (0.01, (1_000, 100_000)),
        (0.005, (1_000, 200_000)),  # the quota would be under 1 ms: a longer period
        (0.002, (1_000, 500_000)),
        (0.001, (1_000, 1_000_000)),
        (0.0001, (1_000, 1_000_000)),  # as little as the kernel allows
    ],
)
def test_cpu_max(cores: float, expected: tuple[int, int]) -> None:
    quota, period = cpu_max(cores)
    assert (quota, period) == expected
    assert quota >= MIN_CPU_QUOTA_US and period <= MAX_CPU_PERIOD_US
