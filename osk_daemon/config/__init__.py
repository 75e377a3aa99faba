"""The daemon's configuration: one TOML file plus drop-ins, loaded into frozen models.

``load_config`` reads and validates; every mistake becomes a ``ConfigError`` naming the
file, the dotted key and a human reason. ``config_json_schema`` describes the file for
editors. The models are the shape; ``loader`` owns merging, provenance and cross-checks.
"""

from osk_daemon.config.loader import ROOT_GROUP, load_config
from osk_daemon.config.models import (
    NAME_PATTERN,
    BackoffConfig,
    Config,
    ConfigFile,
    DaemonConfig,
    FilesystemConfig,
    GroupConfig,
    HealthCheckConfig,
    LimitsConfig,
    LogFormat,
    LogLevel,
    PluginConfig,
    Restart,
    RolloutConfig,
    RolloutStrategy,
    SandboxConfig,
    SandboxLevel,
    SpawnMode,
    StateStrategy,
    Strategy,
    UpdateConfig,
    UpdateMode,
    config_json_schema,
)
from osk_daemon.config.sizes import format_size, parse_size

__all__ = [
    "NAME_PATTERN",
    "ROOT_GROUP",
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
    "format_size",
    "load_config",
    "parse_size",
]
