"""The shape of the configuration: frozen pydantic models, one per TOML table.

These models say what a valid file looks like and nothing else: which keys exist, their
types, defaults and bounds, and rules that relate two keys of the same table (a health
check's ``timeout`` may not exceed its ``interval``). Everything that needs to know where a
value came from (which file, which directory relative paths are resolved against), and every
rule that spans tables (group children must exist, no cycles), lives in ``loader.py``.

The models are strict: TOML is typed, so ``interval = "1"`` or ``enabled = 1`` is an error,
not a silent coercion. Only paths and enumerations are parsed from strings. Validation
errors use short, human reasons in their ``ValueError`` messages because the loader shows
them to operators verbatim.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from osk_daemon.config.sizes import parse_size
from osk_daemon.isolation.levels import SandboxLevel  # the one definition, re-exported

__all__ = [
    "NAME_PATTERN",
    "BackoffConfig",
    "Config",
    "ConfigFile",
    "DaemonConfig",
    "FilesystemConfig",
    "GroupConfig",
    "HealthCheckConfig",
    "LimitsConfig",
    "LogFormat",
    "LogLevel",
    "PluginConfig",
    "Restart",
    "RolloutConfig",
    "RolloutStrategy",
    "SandboxConfig",
    "SandboxLevel",
    "SpawnMode",
    "StateStrategy",
    "Strategy",
    "UpdateConfig",
    "UpdateMode",
    "config_json_schema",
]

NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,62}$"
_NAME_RE = re.compile(NAME_PATTERN)
_SEMVER_RE = re.compile(
    r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)"
    r"(?:-((?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*)(?:\.(?:0|[1-9]\d*|\d*[a-zA-Z-][0-9a-zA-Z-]*))*))?"
    r"(?:\+([0-9a-zA-Z-]+(?:\.[0-9a-zA-Z-]+)*))?$"
)


class Restart(StrEnum):
    """When a supervisor restarts an exited plugin instance (OTP restart types)."""

    PERMANENT = "permanent"  # always
    TRANSIENT = "transient"  # only after an abnormal exit
    TEMPORARY = "temporary"  # never


class Strategy(StrEnum):
    """What a group does to its other children when one of them fails (OTP strategies)."""

    ONE_FOR_ONE = "one_for_one"
    ONE_FOR_ALL = "one_for_all"
    REST_FOR_ONE = "rest_for_one"


class SpawnMode(StrEnum):
    """How a plugin process is created: forked from the zygote, or a fresh interpreter."""

    ZYGOTE = "zygote"
    EXEC = "exec"


class LogFormat(StrEnum):
    TEXT = "text"
    JSON = "json"
    LOGFMT = "logfmt"


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(
            f"invalid name {value!r}: use 1-63 characters a-z, 0-9, '_' or '-', "
            "starting with a lowercase letter"
        )
    return value


def _check_size(value: Any) -> Any:
    if isinstance(value, str | int):
        return parse_size(value)
    return value


# Plugin and group names, used as table keys and in group children.
Name = Annotated[
    str,
    AfterValidator(_check_name),
    WithJsonSchema({"type": "string", "pattern": NAME_PATTERN}),
]
# Paths and enum members are written as TOML strings, so they are parsed even in strict mode.
LaxPath = Annotated[Path, Strict(False)]
Size = Annotated[
    int,
    BeforeValidator(_check_size),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "integer", "minimum": 1024},
                {"type": "string", "pattern": r"^\s*\d+(\.\d+)?\s*[a-zA-Z]*\s*$"},
            ],
            "description": "bytes, or a size such as '16MiB', '512KiB', '1G'",
        }
    ),
]

_MODEL = ConfigDict(frozen=True, extra="forbid", strict=True)


OptSize = Annotated[
    int | None,
    BeforeValidator(_check_size),
    WithJsonSchema(
        {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string"}],
            "description": "bytes, or a size such as '512MiB'",
        }
    ),
]


class LimitsConfig(BaseModel):
    """Resource limits: cgroup quotas (memory, cpu, pids) and rlimits (the rest)."""

    model_config = _MODEL

    memory: OptSize = Field(default=None, ge=1024 * 1024, description="cgroup memory max")
    cpu: float | None = Field(default=None, gt=0, description="cgroup cpu quota, in cores")
    pids: int | None = Field(default=None, ge=1, description="cgroup pids max")
    address_space: OptSize = Field(default=None, ge=1024 * 1024, description="RLIMIT_AS")
    cpu_seconds: int | None = Field(default=None, ge=1, description="RLIMIT_CPU")
    open_files: int | None = Field(default=None, ge=16, description="RLIMIT_NOFILE")
    processes: int | None = Field(default=None, ge=1, description="RLIMIT_NPROC (per uid)")
    file_size: OptSize = Field(default=None, ge=0, description="RLIMIT_FSIZE")
    core: OptSize = Field(default=None, ge=0, description="RLIMIT_CORE")
    stack: OptSize = Field(default=None, ge=64 * 1024, description="RLIMIT_STACK")


class FilesystemConfig(BaseModel):
    """Extra paths a sandboxed plugin may read or write (relative to the config file)."""

    model_config = _MODEL

    read: list[LaxPath] = Field(default_factory=list)
    write: list[LaxPath] = Field(default_factory=list)


class SandboxConfig(BaseModel):
    """The plugin's sandbox level and the grants that loosen it."""

    model_config = _MODEL

    level: Annotated[SandboxLevel, Strict(False)] = SandboxLevel.NONE
    user: str | int = Field(default="nobody", description="standard+: run as this user")
    group: str | int | None = Field(default=None, description="default: the user's group")
    filesystem: FilesystemConfig = Field(default_factory=FilesystemConfig)
    network: bool = Field(default=False, description="strict+: keep the host network")
    require: bool = Field(
        default=True, description="refuse to start if the kernel cannot enforce the level"
    )


class HealthCheckConfig(BaseModel):
    """Periodic ``health`` calls to each instance and what to do when they fail."""

    model_config = _MODEL

    enabled: bool = True
    interval: float = Field(default=1.0, gt=0)
    timeout: float = Field(default=0.5, gt=0)
    failure_threshold: int = Field(default=3, ge=1)
    success_threshold: int = Field(default=1, ge=1)
    auto_restart: bool = True

    @field_validator("timeout")
    @classmethod
    def _timeout_within_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("interval")
        if interval is not None and value > interval:
            raise ValueError(f"must be <= interval ({interval!r}), got {value!r}")
        return value


class BackoffConfig(BaseModel):
    """Restart delay: ``min(max, base * factor**n)`` with +-``jitter`` (a fraction)."""

    model_config = _MODEL

    base: float = Field(default=0.1, ge=0)
    factor: float = Field(default=2.0, ge=1)
    max: float = Field(default=30.0, ge=0)
    jitter: float = Field(default=0.1, ge=0, le=1)
    reset_after: float = Field(default=10.0, ge=0)


class StateStrategy(StrEnum):
    """How a plugin's state survives a version swap (and, for ``disk``, a restart)."""

    MEMORY = "memory"  # the old instance exports, the new one imports, over ZeroMQ
    DISK = "disk"  # also kept in <state_dir>/<plugin>/state.msgpack across restarts
    NONE = "none"


class RolloutStrategy(StrEnum):
    ROLLING = "rolling"
    BLUE_GREEN = "blue-green"
    CANARY = "canary"
    AB = "ab"


class RolloutConfig(BaseModel):
    """How ``oskctl deploy`` swaps this plugin's version (each can be overridden there)."""

    model_config = _MODEL

    strategy: Annotated[RolloutStrategy, Strict(False)] = RolloutStrategy.ROLLING
    max_surge: int = Field(default=1, ge=0)
    max_unavailable: int = Field(default=0, ge=0)
    min_ready: float = Field(
        default=0.0,
        ge=0,
        description="seconds since its READY before a new instance (healthy by then) "
        "counts as available (it takes calls once healthy): old instances are retired, "
        "and steps taken, only then; one that fails meanwhile rolls the swap back",
    )
    steps: list[int] = Field(default_factory=lambda: [5, 25, 50, 100])
    analysis_window: float = Field(default=10.0, gt=0)
    ab_split: int = Field(default=50, gt=0, lt=100)
    drain_timeout: float = Field(default=30.0, gt=0)
    progress_deadline: float = Field(default=120.0, gt=0)
    min_requests: int = Field(default=20, ge=1, description="analysis: fewer fails the step")
    max_error_rate_increase: float = Field(default=0.01, ge=0, le=1)
    max_latency_ratio: float = Field(default=1.5, ge=1)
    latency_floor: float = Field(
        default=0.005,
        ge=0,
        description="analysis: seconds of p99 slack, so two fast versions (0.2 ms and "
        "0.6 ms) do not fail on noise",
    )
    start_cpu: float = Field(
        default=0.01,
        ge=0,
        description="cores a new instance may use while it starts beside serving ones (a "
        "rollout's, a reload's): a cgroup CPU quota, lifted once it asks for its "
        "hand-over state, is ready, or after start_cpu_for seconds. It keeps swaps from "
        "stalling the calls served meanwhile; a start takes longer (~0.6 s instead of "
        "~60 ms). 0: no cap",
    )
    start_cpu_for: float = Field(default=2.0, gt=0, description="seconds, at most, of start_cpu")

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, value: list[int]) -> list[int]:
        if not value or any(not 0 < w <= 100 for w in value) or value != sorted(set(value)):
            raise ValueError(f"must be increasing percentages in 1..100, got {value}")
        return value

    @model_validator(mode="after")
    def _check_surge(self) -> RolloutConfig:
        if self.max_surge == 0 and self.max_unavailable == 0:
            raise ValueError("max_surge and max_unavailable cannot both be 0: nothing could move")
        return self


class UpdateMode(StrEnum):
    MANUAL = "manual"  # list newer versions in `oskctl updates`
    AUTO = "auto"  # deploy them, inside the window


class UpdateConfig(BaseModel):
    """What to do when a newer installed version fits the plugin's range."""

    model_config = _MODEL

    mode: Annotated[UpdateMode, Strict(False)] = UpdateMode.MANUAL
    window: str | None = Field(
        default=None,
        description="auto: when to deploy, local time, e.g. 'Sun 02:00-04:00', 'Mon-Fri "
        "01:00-03:00' or '22:00-06:00' (daily); unset: any time",
    )
    strategy: Annotated[RolloutStrategy, Strict(False)] = RolloutStrategy.ROLLING

    @field_validator("window")
    @classmethod
    def _check_window(cls, value: str | None) -> str | None:
        if value is not None:
            from osk_daemon.rollout.window import parse_window  # lazy: rollout imports config

            parse_window(value)
        return value


class PluginConfig(BaseModel):
    """One plugin: where its code is, how many instances run, and how they are supervised."""

    model_config = _MODEL

    entry: str | None = Field(
        default=None, description="module:Class or an entry point; from the manifest if installed"
    )
    path: list[LaxPath] = Field(default_factory=list)
    version: str | None = Field(
        default=None,
        description="an exact version, or an npm range chosen from daemon.plugins_dir",
    )
    critical: bool = Field(
        default=False, description="boot-critical: a failed start rolls back the boot"
    )
    instances: int = Field(default=1, ge=1, le=64)
    restart: Annotated[Restart, Strict(False)] = Restart.PERMANENT
    shutdown_timeout: float = Field(default=5.0, gt=0)
    start_timeout: float = Field(default=10.0, gt=0)
    spawn: Annotated[SpawnMode, Strict(False)] = SpawnMode.ZYGOTE
    standby: bool = Field(
        default=False,
        description="keep a started spare process per instance (its module imported, "
        "confined, connected) that a crash promotes: restarts in a few ms, at the cost "
        "of one idle process per instance",
    )
    config: dict[str, Any] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    health_check: HealthCheckConfig = Field(default_factory=HealthCheckConfig)
    backoff: BackoffConfig = Field(default_factory=BackoffConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    sandbox: SandboxConfig = Field(default_factory=SandboxConfig)
    watch: list[str] = Field(
        default_factory=list,
        description="hot reload: globs (relative to the plugin's path) whose change swaps it",
    )
    watch_debounce: float = Field(default=0.3, gt=0, description="seconds of quiet first")
    preserve_state: bool = Field(default=True, description="hand state to the next version")
    state_strategy: Annotated[StateStrategy, Strict(False)] = StateStrategy.MEMORY
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    update: UpdateConfig = Field(default_factory=UpdateConfig)

    @field_validator("entry")
    @classmethod
    def _check_entry(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if not value.strip():
            raise ValueError("must not be empty")
        if ":" in value:
            module, _, attr = value.partition(":")
            if not _is_dotted(module) or not _is_dotted(attr):
                raise ValueError(f"expected 'module:Class' with dotted Python names, got {value!r}")
        elif any(c.isspace() for c in value):
            raise ValueError(f"an entry-point name may not contain spaces, got {value!r}")
        return value

    @field_validator("version")
    @classmethod
    def _check_version(cls, value: str | None) -> str | None:
        if value is None or _SEMVER_RE.match(value):
            return value
        from osk_daemon.versioning.semver import Range  # lazy: versioning imports config

        try:
            Range.parse(value)
        except ValueError as exc:
            raise ValueError(
                f"must be a SemVer 2.0 version such as '1.2.3' or a range such as '^1.2', "
                f"got {value!r} ({exc})"
            ) from exc
        return value

    @property
    def exact_version(self) -> bool:
        """True when ``version`` names one version (or is unset), not a range."""
        return self.version is None or bool(_SEMVER_RE.match(self.version))


def _is_dotted(text: str) -> bool:
    return bool(text) and all(part.isidentifier() for part in text.split("."))


class GroupConfig(BaseModel):
    """A supervision group: children (plugins or groups) in start order and a strategy."""

    model_config = _MODEL

    strategy: Annotated[Strategy, Strict(False)] = Strategy.ONE_FOR_ONE
    intensity: int = Field(default=5, ge=0)
    period: float = Field(default=10.0, gt=0)
    children: list[Name] = Field(default_factory=list)


class DaemonConfig(BaseModel):
    """Daemon-wide settings. ``control_socket`` defaults to ``runtime_dir/control.sock``."""

    model_config = _MODEL

    runtime_dir: LaxPath = Path("/run/osk")
    plugins_dir: LaxPath | None = Field(
        default=None,
        description="installed plugins: <plugins_dir>/<name>/<version>/osk-plugin.toml",
    )
    rollback_on_failure: bool = Field(
        default=False,
        description="a critical plugin failing to start stops what booted, in reverse",
    )
    state_dir: LaxPath = Field(
        default=Path("/var/lib/osk"), description="plugins' writable state: <state_dir>/<plugin>"
    )
    cgroups: bool = Field(default=True, description="confine instances in cgroups if possible")
    control_socket: LaxPath = Field(
        default=Path("/run/osk/control.sock"),
        description="defaults to runtime_dir/control.sock",
    )
    control_group: str | None = None
    log_format: Annotated[LogFormat, Strict(False)] = LogFormat.TEXT
    log_level: Annotated[LogLevel, Strict(False)] = LogLevel.INFO
    log_buffer_lines: int = Field(default=1000, gt=0)
    # unset: 1 s, or heartbeat_timeout / 3 if that is less (3 beats per timeout); a beat
    # wakes an idle worker (~0.35 ms of CPU each on a small VM), so 500 idle plugins at
    # 0.5 s cost a third of a core for nothing more
    heartbeat_interval: float = Field(
        default=1.0, gt=0, description="default: min(1.0, heartbeat_timeout / 3)"
    )
    heartbeat_timeout: float = Field(default=3.0, gt=0)
    max_message_size: Size = Field(default=16 * 1024 * 1024, ge=1024)
    call_timeout: float = Field(default=10.0, gt=0)
    shutdown_timeout: float = Field(default=30.0, gt=0)
    orphan_timeout: float = Field(
        default=30.0,
        ge=0,
        description=(
            "how long a plugin outlives a daemon that died or was killed, waiting to be "
            "re-adopted by the next one; 0 ties plugins to the daemon: they stop as soon as "
            "it is gone (and from sandbox level minimal get PR_SET_PDEATHSIG), and a "
            "restarted daemon starts them afresh"
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _default_heartbeat_interval(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("heartbeat_interval") is None:
            timeout = data.get("heartbeat_timeout", 3.0)
            if isinstance(timeout, int | float) and not isinstance(timeout, bool) and timeout > 0:
                return {**data, "heartbeat_interval": min(1.0, float(timeout) / 3)}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_control_socket(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("control_socket") is None:
            runtime_dir = data.get("runtime_dir", Path("/run/osk"))
            if isinstance(runtime_dir, str | Path):
                return {**data, "control_socket": Path(runtime_dir) / "control.sock"}
        return data

    @field_validator("heartbeat_timeout")
    @classmethod
    def _timeout_above_interval(cls, value: float, info: ValidationInfo) -> float:
        interval = info.data.get("heartbeat_interval")
        if interval is not None and value <= interval:
            raise ValueError(f"must be > heartbeat_interval ({interval!r}), got {value!r}")
        return value


class MetricsConfig(BaseModel):
    """Prometheus metrics over HTTP; off unless ``listen`` is set."""

    model_config = _MODEL

    listen: str | None = Field(
        default=None, description="host:port, e.g. '127.0.0.1:9184' (unset: no metrics)"
    )

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str | None) -> str | None:
        if value is not None:
            from osk_daemon.observability.metrics import parse_listen  # lazy: it is heavy

            parse_listen(value)
        return value


class TracingConfig(BaseModel):
    """OpenTelemetry spans for calls, restarts and rollouts; off unless an exporter is set."""

    model_config = _MODEL

    exporter: Literal["none", "console", "file", "otlp"] = "none"
    file: LaxPath | None = Field(
        default=None, description="file exporter: JSON lines (default runtime_dir/traces.jsonl)"
    )
    sample_ratio: float = Field(default=1.0, ge=0, le=1)


class _Tables(BaseModel):
    model_config = _MODEL

    daemon: DaemonConfig = Field(default_factory=DaemonConfig)
    metrics: MetricsConfig = Field(default_factory=MetricsConfig)
    tracing: TracingConfig = Field(default_factory=TracingConfig)
    plugins: dict[Name, PluginConfig] = Field(default_factory=dict)
    groups: dict[Name, GroupConfig] = Field(default_factory=dict)


class ConfigFile(_Tables):
    """What one TOML file may contain: the tables plus ``include`` globs for drop-ins."""

    include: list[str] = Field(
        default_factory=list,
        description="globs of drop-in files, relative to this file, merged over it in order",
    )


class Config(_Tables):
    """A loaded, cross-checked configuration.

    ``plugins`` keep file order. ``groups`` always holds ``"root"``, whose children include
    every plugin and group no other group lists. ``source`` is the main file, absolute.
    """

    source: Path


def config_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of one TOML config file, for editors and linters."""
    return ConfigFile.model_json_schema()
