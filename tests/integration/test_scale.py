"""Many instances at once: every spawn request must reach the zygote.

64 instances (the most a plugin may have) start together, so most spawn requests find no
warm child and queue on the zygote's socket until it drains. Two requests waiting for
that socket once replaced each other's wake-up (asyncio keeps one writer per fd) and the
loser never started; the daemon then also hung at shutdown on an instance that had no
process.
"""

from __future__ import annotations

import pytest

from tests.integration.harness import daemon_config, plugin_block, running_daemon

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def test_sixty_four_instances_start_together_and_stop() -> None:
    body = plugin_block("many", instances=64, health_check={"interval": 5.0, "timeout": 1.0})
    with running_daemon(daemon_config(body)) as d:  # waits until every instance is ready
        rows = d.status("many")
        assert len(rows) == 64
        assert len({r["pid"] for r in rows}) == 64
        assert d.call("many", "echo", {"text": "x"})["text"] == "x"
    # running_daemon stopped it and checked that no process or cgroup is left
