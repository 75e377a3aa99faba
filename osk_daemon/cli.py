"""``osk-daemon``: run the daemon, check a config, print the config's JSON Schema.

    osk-daemon run --config configs/demo.toml
    osk-daemon check-config configs/demo.toml
    osk-daemon schema

Exit codes: 0 ok, 1 runtime failure, 2 bad usage or an invalid config.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from osk_daemon.errors import ConfigError, OskError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="osk-daemon", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run the daemon in the foreground")
    run.add_argument("--config", "-c", required=True, help="the daemon's TOML config file")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["text", "json", "logfmt"])
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file")
    sub.add_parser("schema", help="print the JSON Schema of the config file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from osk_daemon.config import config_json_schema, load_config

    if args.command == "schema":
        print(json.dumps(config_json_schema(), indent=2))
        return 0
    try:
        config = load_config(args.file if args.command == "check-config" else args.config)
        if args.command == "check-config":
            return _check(args.file, config)
    except ConfigError as exc:
        print(f"osk-daemon: invalid config: {exc}", file=sys.stderr)
        return 2
    return _run(config, args.log_level, args.log_format)


def _check(shown: str, config: object) -> int:
    """Resolve versions too, so a conflict shows here and not only at start."""
    from osk_daemon.config import Config
    from osk_daemon.versioning.planning import plan_start

    assert isinstance(config, Config)
    plan = plan_start(config)
    plugins = plan.config.plugins
    count = sum(p.instances for p in plugins.values())
    print(f"{shown}: ok ({len(plugins)} plugins, {count} instances)")
    for number, wave in enumerate(plan.waves):
        names = ", ".join(f"{name} {plugins[name].version}" for name in wave)
        print(f"  start wave {number}: {names}")
    for name in plan.pulled_in:
        print(f"  {name} is not in the config; started because others require it")
    for warning in plan.warnings:
        print(f"  warning: {warning}")
    return 0


def _run(config: object, level: str | None, fmt: str | None) -> int:
    import anyio

    from osk_daemon.config import Config
    from osk_daemon.daemon import run_daemon
    from osk_daemon.observability.logs import setup_logging

    assert isinstance(config, Config)
    setup_logging(level or config.daemon.log_level, fmt or config.daemon.log_format)
    try:
        anyio.run(run_daemon, config)
    except ConfigError as exc:
        print(f"osk-daemon: refusing to start: {exc}", file=sys.stderr)
        return 2
    except OskError as exc:
        print(f"osk-daemon: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # pragma: no cover - SIGINT is handled inside the daemon
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
