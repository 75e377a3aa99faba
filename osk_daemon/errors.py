"""One exception hierarchy for the whole daemon, split by who is at fault.

- ``ConfigError``: the operator wrote something wrong (file, key path, reason).
- ``PluginError`` and its kinds: a plugin misbehaved or failed.
- ``TransportError``: a frame, socket or deadline problem between processes.
- ``ControlError``: a control-socket request was refused or malformed.
- ``CgroupError`` and ``SandboxError``: confining a plugin failed (the host or the plan);
  they live here, not in ``isolation``, so the wire registry can name them without cycles.
- ``OskInternalError``: a bug in osk-daemon itself.

Every error carries a machine-readable ``code`` so it can travel over the wire and
be turned back into the same class on the other side (see ``error_from_wire``).
"""

from __future__ import annotations

TYPE_CHECKING = False  # typing's constant without importing typing: oskctl starts lean
if TYPE_CHECKING:
    from typing import Any, ClassVar


class OskError(Exception):
    """Root of every error osk-daemon raises on purpose."""

    code: ClassVar[str] = "error"

    def to_wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "type": type(self).__name__}


class ConfigError(OskError):
    """The configuration is invalid. ``file`` and ``key`` say where, ``reason`` says why."""

    code = "config"

    def __init__(self, file: str, key: str, reason: str) -> None:
        self.file = file
        self.key = key
        self.reason = reason
        where = f"{file}: {key}" if key else file
        super().__init__(f"{where}: {reason}")


class PluginError(OskError):
    """A plugin failed: its handler raised, it crashed, or it could not be loaded."""

    code = "plugin"


class PluginLoadError(PluginError):
    code = "plugin_load"


class RemoteError(PluginError):
    """A plugin's RPC handler raised; ``remote_type`` is the exception's class name."""

    code = "remote"

    def __init__(self, message: str, remote_type: str = "Exception") -> None:
        self.remote_type = remote_type
        super().__init__(message)

    def to_wire(self) -> dict[str, Any]:
        return {**super().to_wire(), "remote_type": self.remote_type}


class MethodNotFound(PluginError):
    code = "no_method"


class BootFailed(PluginError):
    """A critical plugin failed to start and the boot was rolled back
    (``daemon.rollback_on_failure``); ``rolled_back`` lists what was stopped, in order."""

    code = "boot_failed"

    def __init__(self, reason: str, rolled_back: list[str]) -> None:
        self.reason = reason
        self.rolled_back = rolled_back
        stopped = ", ".join(rolled_back) if rolled_back else "nothing had started"
        super().__init__(f"boot failed: {reason}; rolled back: {stopped}")


class TransportError(OskError):
    """Something went wrong between processes: a bad frame, a closed socket."""

    code = "transport"


class FrameError(TransportError):
    """A frame could not be decoded or broke a limit; it is dropped, never routed."""

    code = "bad_frame"


class DeadlineExceeded(TransportError):
    """The request's deadline passed before an answer came."""

    code = "timeout"


class Unavailable(TransportError):
    """No instance of the target plugin can take the request (stopped, failed, unknown)."""

    code = "unavailable"


class ControlError(OskError):
    """A control-socket request was refused (bad command, bad arguments, not allowed)."""

    code = "control"


class CgroupError(OskError):
    """A cgroup could not be detected, created, limited, read, killed or removed.

    ``path`` and ``errno`` say which file and why, when the cause was a system call.
    """

    code = "cgroup"

    def __init__(self, message: str, path: str | None = None, errno: int | None = None) -> None:
        self.path = path
        self.errno = errno
        super().__init__(message)


class SandboxError(OskError):
    """A required sandbox step could not be applied (or a launch plan is malformed)."""

    code = "sandbox"


class OskInternalError(OskError):
    """A bug in osk-daemon. Please report it with the log."""

    code = "internal"


_BY_CODE: dict[str, type[OskError]] = {
    cls.code: cls
    for cls in (
        OskError,
        PluginError,
        PluginLoadError,
        MethodNotFound,
        TransportError,
        FrameError,
        DeadlineExceeded,
        Unavailable,
        ControlError,
        CgroupError,
        SandboxError,
        OskInternalError,
    )
}


def error_from_wire(data: Any) -> OskError:
    """Rebuild an error sent with ``to_wire``; unknown shapes become ``OskInternalError``."""
    if not isinstance(data, dict):
        return OskInternalError(f"malformed error payload: {data!r:.200}")
    code = data.get("code")
    message = str(data.get("message", ""))
    if code == RemoteError.code:
        return RemoteError(message, str(data.get("remote_type", "Exception")))
    cls = _BY_CODE.get(str(code), OskError)
    if cls is ConfigError:  # pragma: no cover - config errors do not travel on the wire
        return OskError(message)
    return cls(message)
