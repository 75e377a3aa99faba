"""The plugin SDK: everything a plugin author imports, and nothing else.

    from osk_daemon.worker import Plugin, rpc, Context, Health, HealthStatus

This surface is a promise to plugin authors; keep it small and stable. The process side
(``runtime.run_worker``) is for the daemon's spawner, not for plugins.
"""

from osk_daemon.worker.context import Context
from osk_daemon.worker.sdk import Health, HealthStatus, Plugin, rpc

__all__ = ["Context", "Health", "HealthStatus", "Plugin", "rpc"]
