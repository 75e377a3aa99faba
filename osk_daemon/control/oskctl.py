"""``oskctl``: the operator's command-line client for a running osk-daemon.

Why: a thin, fast, dependency-free front end to the control socket, usable by hand and
from scripts (stable exit codes, ``--json``).

How: argparse builds one request, a blocking AF_UNIX socket sends it, replies are read with
``protocol.LineSplitter`` and shown with ``render``. Only the standard library (and the
stdlib-only ``protocol``/``errors``/``render`` modules) is imported, and of it nothing
that argparse and json do not import anyway: not ``typing`` (~5 ms here), ``pathlib``
(~2.5 ms), ``socket`` (~2 ms: the C module ``_socket`` does all oskctl needs) nor
``dataclasses`` (~8 ms, through ``inspect``), so that start-up stays fast:
``python -X importtime -m osk_daemon.control.oskctl status`` shows what it pays.

Socket path, first match wins: ``--socket``; ``$OSK_SOCKET``; ``[daemon] control_socket``
(or ``runtime_dir``/control.sock) from ``--config`` or ``$OSK_CONFIG``; ``/run/osk/control.sock``.

Exit codes: 0 ok; 1 the daemon answered with an error; 2 bad usage; 3 the daemon is
unreachable; 4 timed out waiting for it; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import _socket
import argparse
import json
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence

from osk_daemon.control import render, render_rollout, top
from osk_daemon.control.protocol import (
    MAX_REPLY_LINE,
    BadReply,
    ErrorReply,
    LineSplitter,
    LineTooLong,
    Reply,
    Result,
    StreamItem,
    decode_reply,
    encode_request,
)

TYPE_CHECKING = False  # typing's constant without importing typing: oskctl starts lean
if TYPE_CHECKING:
    from typing import Any

DEFAULT_SOCKET = "/run/osk/control.sock"
DEFAULT_TIMEOUT = 30.0
CALL_TIMEOUT_MARGIN = 5.0

EXIT_OK = 0
EXIT_DAEMON_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_TIMEOUT = 4
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141


class SocketChoice:
    """The socket to use and a human phrase saying how it was chosen (for error hints)."""

    __slots__ = ("path", "source")

    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.source = source


class UsageError(Exception):
    """Bad arguments or configuration discovered after argparse (exit 2)."""


class Unreachable(Exception):
    """The socket is missing, refused, or hung up before answering (exit 3)."""


class DaemonError(Exception):
    """The daemon answered ``{"ok": false, ...}`` (exit 1)."""

    def __init__(self, code: str, message: str) -> None:
        self.code = code
        self.message = message
        super().__init__(f"{code}: {message}")


def resolve_socket(
    socket_arg: str | None, config_arg: str | None, environ: Mapping[str, str]
) -> SocketChoice:
    """Pick the control socket (see the module docstring). Raises ``UsageError``."""
    if socket_arg is not None:
        return SocketChoice(socket_arg, "from --socket")
    if environ.get("OSK_SOCKET"):
        return SocketChoice(environ["OSK_SOCKET"], "from $OSK_SOCKET")
    if config_arg is not None:
        return _socket_from_config(config_arg, "--config")
    if environ.get("OSK_CONFIG"):
        return _socket_from_config(environ["OSK_CONFIG"], "$OSK_CONFIG")
    return SocketChoice(DEFAULT_SOCKET, "the default; use --socket, $OSK_SOCKET or --config")


def _socket_from_config(config: str, flag: str) -> SocketChoice:
    import tomllib

    try:
        with open(config, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise UsageError(f"cannot read config {config} (from {flag}): {exc}") from exc
    daemon = data.get("daemon", {})
    if not isinstance(daemon, dict):
        raise UsageError(f"{config}: [daemon] must be a table")
    base = os.path.dirname(config)
    where = f"{config} (from {flag})"
    for key in ("control_socket", "runtime_dir"):
        if key in daemon and not isinstance(daemon[key], str):
            raise UsageError(f"{config}: daemon.{key} must be a string")
    if "control_socket" in daemon:
        path = os.path.normpath(os.path.join(base, daemon["control_socket"]))
        return SocketChoice(path, f"from [daemon] control_socket in {where}")
    if "runtime_dir" in daemon:
        path = os.path.join(
            os.path.normpath(os.path.join(base, daemon["runtime_dir"])), "control.sock"
        )
        return SocketChoice(path, f"from [daemon] runtime_dir in {where}")
    return SocketChoice(DEFAULT_SOCKET, f"the default; {where} sets no daemon.control_socket")


# -- talking to the daemon --------------------------------------------------------------------


class _Client:
    def __init__(self, choice: SocketChoice, timeout: float) -> None:
        self.choice = choice
        self.timeout = timeout
        self.sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.sock.settimeout(timeout)

    def __enter__(self) -> _Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _unreachable(self, what: str) -> Unreachable:
        return Unreachable(
            f"cannot reach the daemon at {self.choice.path} ({self.choice.source}): {what}"
        )

    def send(self, data: bytes) -> None:
        try:
            self.sock.connect(self.choice.path)
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise self._unreachable(f"{exc.strerror}; is osk-daemon running?") from exc
        except PermissionError as exc:
            raise self._unreachable(
                f"{exc.strerror}; run as root or the daemon's user, or join daemon.control_group"
            ) from exc
        except TimeoutError:
            raise
        except OSError as exc:
            raise self._unreachable(str(exc.strerror or exc)) from exc
        try:
            self.sock.sendall(data)
        except TimeoutError:
            raise
        except OSError:
            pass  # the daemon may have answered (e.g. "forbidden") and hung up; read it

    def replies(self, *, follow: bool) -> Iterator[Reply]:
        """Reply lines until the final one; ``follow`` waits for stream items forever."""
        if follow:
            self.sock.settimeout(None)
        splitter = LineSplitter(MAX_REPLY_LINE)
        while True:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                raise
            except OSError as exc:
                raise self._unreachable(f"connection lost: {exc.strerror or exc}") from exc
            if not data:
                raise self._unreachable("the daemon closed the connection without answering")
            try:
                lines = splitter.feed(data)
            except LineTooLong as exc:
                raise BadReply(str(exc)) from exc
            for line in lines:
                reply = decode_reply(line)
                yield reply
                if not isinstance(reply, StreamItem):
                    return


def _exchange(
    choice: SocketChoice, timeout: float, cmd: str, args: dict[str, Any], *, follow: bool = False
) -> Iterator[StreamItem | Result]:
    """Send one request; yield its stream items and its final result. Raises ``DaemonError``."""
    with _Client(choice, timeout) as client:
        client.send(encode_request(cmd, args))
        for reply in client.replies(follow=follow):
            if isinstance(reply, ErrorReply):
                raise DaemonError(reply.code, reply.message)
            yield reply


def _request(choice: SocketChoice, timeout: float, cmd: str, args: dict[str, Any]) -> Any:
    for reply in _exchange(choice, timeout, cmd, args):
        if isinstance(reply, Result):
            return reply.value
    return None  # pragma: no cover - _exchange always ends with a Result or raises


# -- commands ---------------------------------------------------------------------------------


def _out(text: str, *, flush: bool = False) -> None:
    print(text, flush=flush)


def _run(ns: argparse.Namespace, choice: SocketChoice, timeout: float) -> None:
    as_json: bool = getattr(ns, "json", False)
    cmd: str = ns.command
    if cmd == "status":
        result = _request(choice, timeout, "status", {"plugin": ns.name})
        if as_json or not isinstance(result, list):
            _out(render.format_json(result))
        else:
            _out(render.format_status([r if isinstance(r, dict) else {} for r in result]))
    elif cmd in ("start", "stop", "restart"):
        result = _request(choice, timeout, cmd, {"name": ns.name, "instance": ns.instance})
        _out(render.format_json(result) if as_json else render.format_message(result))
    elif cmd == "graph":
        result = _request(choice, timeout, "graph", {})
        if as_json or not isinstance(result, dict):
            _out(render.format_json(result))
        elif ns.dot:
            _out(render.format_graph_dot(result))
        else:
            _out(render.format_graph(result))
    elif cmd == "deploy":
        args = {
            "plugin": ns.plugin,
            "version": ns.version,
            "strategy": ns.strategy,
            "steps": ns.steps,
            "analysis_window": ns.analysis_window,
            "max_surge": ns.max_surge,
            "max_unavailable": ns.max_unavailable,
            "min_ready": ns.min_ready,
            "ab_split": ns.ab_split,
            "follow": not ns.no_follow,
        }
        show = render.format_json_line if as_json else render_rollout.format_rollout_progress
        _stream(choice, timeout, "deploy", args, follow=not ns.no_follow, show=show)
    elif cmd == "rollout":
        follow = ns.action == "rollback" or (ns.action == "status" and ns.follow)
        args = {"action": ns.action, "plugin": ns.plugin, "follow": follow}
        if ns.action in ("pause", "resume", "promote", "abort", "rollback") and not ns.plugin:
            raise UsageError(f"rollout {ns.action} needs the plugin's name")
        if ns.follow and not (ns.action == "status" and ns.plugin):
            raise UsageError("-f follows one plugin's rollout: oskctl rollout status PLUGIN -f")
        show = render.format_json_line if as_json else _rollout_line
        _stream(choice, timeout, "rollout", args, follow=follow, show=show)
    elif cmd == "top":

        def fetch() -> list[Any]:
            rows = _request(choice, timeout, "status", {})
            return rows if isinstance(rows, list) else []

        top.run_top(fetch, ns.interval, ns.iterations, lambda text: _out(text, flush=True))
    elif cmd == "updates":
        result = _request(choice, timeout, "updates", {})
        if as_json or not isinstance(result, list):
            _out(render.format_json(result))
        else:
            _out(render_rollout.format_updates(result))
    elif cmd in ("reload", "load", "unload"):
        args = {}
        if cmd == "load":
            args = {"path": os.path.abspath(ns.path)}
        elif cmd == "unload":
            args = {"name": ns.name, "strategy": ns.strategy, "dependents": ns.dependents}
        result = _request(choice, timeout, cmd, args)
        _out(render.format_json(result))
    elif cmd in ("shutdown", "reexec"):
        result = _request(choice, timeout, cmd, {})
        _out(render.format_json(result) if as_json else render.format_message(result))
    elif cmd == "call":
        args = {
            "plugin": ns.plugin,
            "method": ns.method,
            "args": ns.call_args,
            "timeout": ns.call_timeout,
            "version": ns.version,
            "key": ns.key,
            "instance": ns.instance,
        }
        _out(render.format_json(_request(choice, timeout, "call", args)))
    elif cmd == "logs":
        args = {"name": ns.name, "lines": ns.lines, "follow": ns.follow}
        show = render.format_json_line if as_json else _log_line
        _stream(choice, timeout, "logs", args, follow=ns.follow, show=show)
    elif cmd == "events":
        show = render.format_json_line
        _stream(choice, timeout, "events", {"follow": ns.follow}, follow=ns.follow, show=show)
    else:  # pragma: no cover - argparse only accepts the commands above
        raise UsageError(f"unknown command {cmd!r}")


def _rollout_line(item: Any) -> str:
    if isinstance(item, dict) and "event" in item:
        return render_rollout.format_rollout_progress(item)
    if isinstance(item, dict) and "plugin" in item:
        return render_rollout.format_rollout_status(item)
    return render.format_json(item)


def _steps(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected percentages like 5,25,50,100: {text!r}"
        ) from None


def _log_line(item: Any) -> str:
    return render.format_log_line(item) if isinstance(item, dict) else str(item)


def _stream(
    choice: SocketChoice,
    timeout: float,
    cmd: str,
    args: dict[str, Any],
    *,
    follow: bool,
    show: Any,
) -> None:
    for reply in _exchange(choice, timeout, cmd, args, follow=follow):
        if isinstance(reply, StreamItem):
            _out(show(reply.item), flush=follow)
        elif isinstance(reply.value, list):
            for item in reply.value:
                _out(show(item), flush=follow)
        elif reply.value is not None:
            _out(show(reply.value), flush=follow)


# -- arguments --------------------------------------------------------------------------------


def _json_arg(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not valid JSON: {exc}") from exc


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def _add_common(parser: argparse.ArgumentParser, *, socket_timeout: bool) -> None:
    # SUPPRESS defaults let the same flags appear before or after the command name.
    s = argparse.SUPPRESS
    parser.add_argument("--socket", default=s, help="control socket path")
    parser.add_argument("--config", default=s, help="daemon config (TOML)")
    parser.add_argument("--json", action="store_true", default=s, help="print raw JSON")
    if socket_timeout:
        parser.add_argument(
            "--timeout",
            dest="socket_timeout",
            type=_positive,
            default=s,
            help=f"seconds to wait for the daemon (default {DEFAULT_TIMEOUT:g})",
        )


def _status_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", default=None, metavar="NAME")


def _lifecycle_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--instance", type=int, default=None, metavar="N")


def _call_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plugin", metavar="PLUGIN")
    p.add_argument("method", metavar="METHOD")
    p.add_argument("call_args", nargs="?", type=_json_arg, default=None, metavar="ARGS_JSON")
    p.add_argument("--timeout", dest="call_timeout", type=_positive, default=None)
    p.add_argument("--version", default=None, metavar="V", help="version constraint")
    p.add_argument("--key", default=None, metavar="K", help="sticky routing key (A/B, canary)")
    p.add_argument("--instance", type=int, default=None, metavar="N", help="prefer instance N")


def _logs_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("-n", dest="lines", type=int, default=None, metavar="N", help="last N lines")
    p.add_argument("-f", dest="follow", action="store_true", help="keep following")


def _events_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-f", dest="follow", action="store_true", help="keep following")


def _graph_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dot", action="store_true", help="print Graphviz DOT (pipe to dot -Tsvg)")


def _deploy_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("plugin", metavar="PLUGIN")
    p.add_argument("--version", required=True, metavar="V", help="a version or a range")
    p.add_argument("--strategy", choices=["rolling", "blue-green", "canary", "ab"], default=None)
    p.add_argument("--steps", type=_steps, default=None, help="canary weights, e.g. 5,25,50,100")
    p.add_argument("--analysis-window", type=_positive, default=None, metavar="SECONDS")
    p.add_argument("--max-surge", type=int, default=None, metavar="N", help="rolling: extra")
    p.add_argument("--max-unavailable", type=int, default=None, metavar="N", help="rolling")
    p.add_argument("--min-ready", type=float, default=None, metavar="SECONDS")
    p.add_argument("--ab-split", type=int, default=None, metavar="PERCENT", help="ab: new share")
    p.add_argument("--no-follow", action="store_true", help="start it and return at once")


def _rollout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["status", "pause", "resume", "promote", "abort", "rollback"])
    p.add_argument("plugin", nargs="?", default=None, metavar="PLUGIN")
    p.add_argument(
        "-f", dest="follow", action="store_true", help="status: follow it live until it ends"
    )


def _top_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--interval", type=_positive, default=1.0, metavar="SECONDS")
    p.add_argument("-n", dest="iterations", type=int, default=None, help="stop after N screens")


def _load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", metavar="PATH")


def _unload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", metavar="NAME")
    p.add_argument("--strategy", choices=["graceful", "forceful", "drain"], default="graceful")
    p.add_argument("--dependents", choices=["cascade", "warn", "block"], default="block")


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


# name -> (help, its own arguments, whether it takes --timeout); in --help's order
COMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None], bool]] = {
    "status": ("show plugin instances", _status_args, True),
    "start": ("start a plugin (or one instance)", _lifecycle_args, True),
    "stop": ("stop a plugin (or one instance)", _lifecycle_args, True),
    "restart": ("restart a plugin (or one instance)", _lifecycle_args, True),
    "call": ("call a plugin method", _call_args, False),
    "logs": ("show a plugin's output", _logs_args, True),
    "events": ("show daemon events", _events_args, True),
    "graph": ("show the plugin dependency graph, by start wave", _graph_args, True),
    "deploy": ("swap a plugin to another installed version, without downtime", _deploy_args, True),
    "rollout": ("show or steer a rollout", _rollout_args, True),
    "top": ("a live view of instances: cpu, memory, calls/s, errors, health", _top_args, True),
    "updates": ("list newer installed versions that fit each plugin's range", _no_args, True),
    "reload": (
        "apply the edited config file (like SIGHUP); a bad one changes nothing",
        _no_args,
        True,
    ),
    "load": ("start a plugin from its folder (with osk-plugin.toml) at run time", _load_args, True),
    "unload": ("stop a plugin for good and forget it", _unload_args, True),
    "shutdown": ("stop the daemon and all plugins", _no_args, True),
    "reexec": (
        "restart the daemon in place (same pid, e.g. after an upgrade); plugins keep running",
        _no_args,
        True,
    ),
}
_VALUED_FLAGS = ("--socket", "--config", "--timeout")  # the global flags that take a value


def named_command(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word that is not a global flag or a flag's
    value), if it is one of ``COMMANDS``."""
    words = iter(argv)
    for word in words:
        if word.startswith("--") and any(f.startswith(word) for f in _VALUED_FLAGS):
            next(words, None)  # argparse takes "--sock" for "--socket"; so do we
        elif not word.startswith("-"):
            return word if word in COMMANDS else None
    return None


class _Formatter(argparse.HelpFormatter):
    """argparse's help formatter, told the width so that it does not import ``shutil``.

    argparse makes a formatter for every ``add_argument`` (to check the metavar), help or
    not, and one that is not told the width imports ``shutil`` for it, and with it zlib,
    bz2 and lzma: ~4 ms of every oskctl start here.
    """

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


def _columns() -> int:
    """The width ``shutil.get_terminal_size`` would give: ``$COLUMNS``, the terminal's, 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns <= 0:
        try:
            columns = os.get_terminal_size(sys.__stdout__.fileno()).columns  # type: ignore[union-attr]
        except (AttributeError, ValueError, OSError):
            columns = 0
    return columns if columns > 0 else 80


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``oskctl`` argument parser. Given the ``argv`` it will parse, only the command
    that names gets a parser: building all of them cost every start ~4 ms. Without one
    (or when it names none: ``oskctl --help``, a typo) every command is there."""
    parser = argparse.ArgumentParser(
        prog="oskctl", description="Control a running osk-daemon.", formatter_class=_Formatter
    )
    _add_common(parser, socket_timeout=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    only = named_command(argv) if argv is not None else None
    for name, (help_text, add_args, socket_timeout) in COMMANDS.items():
        if only is None or name == only:
            p = sub.add_parser(
                name, help=help_text, description=help_text, formatter_class=_Formatter
            )
            _add_common(p, socket_timeout=socket_timeout)
            add_args(p)
    return parser


def _fail(code: int, message: str) -> int:
    print(f"oskctl: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Run ``oskctl`` with ``argv`` (default ``sys.argv[1:]``); return the exit code.

    Bad usage exits through argparse (``SystemExit(2)``).
    """
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(argv)
    ns = parser.parse_args(argv)
    if ns.command == "graph" and ns.dot and getattr(ns, "json", False):
        parser.error("graph: --dot and --json are mutually exclusive")
    timeout: float = getattr(ns, "socket_timeout", DEFAULT_TIMEOUT)
    if ns.command == "call" and ns.call_timeout is not None:
        timeout = max(timeout, ns.call_timeout + CALL_TIMEOUT_MARGIN)
    try:
        choice = resolve_socket(
            getattr(ns, "socket", None), getattr(ns, "config", None), os.environ
        )
    except UsageError as exc:
        return _fail(EXIT_USAGE, str(exc))
    try:
        _run(ns, choice, timeout)
    except DaemonError as exc:
        return _fail(EXIT_DAEMON_ERROR, str(exc))
    except BadReply as exc:
        return _fail(EXIT_DAEMON_ERROR, f"{exc.code}: {exc}")
    except Unreachable as exc:
        return _fail(EXIT_UNREACHABLE, str(exc))
    except TimeoutError:
        return _fail(
            EXIT_TIMEOUT,
            f"timed out after {timeout:g}s waiting for the daemon at {choice.path}; "
            "it may be busy (raise --timeout)",
        )
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        _silence_stdout()
        return EXIT_BROKEN_PIPE
    return EXIT_OK


def _silence_stdout() -> None:
    # Python would report the broken pipe again when flushing stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run() -> None:
    """The ``oskctl`` command: ``main``, flush, and exit without tearing the interpreter
    down. A CLI's last act need not free every object it made: after a status of 500
    instances that teardown took ~10 ms of a ~60 ms run (median of 20, measured).
    ``SystemExit`` (argparse's usage errors, ``--help``) exits the usual way."""
    code = main()
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left (``oskctl status | head``)
        code = code or EXIT_BROKEN_PIPE
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass  # nothing left to tell anyone
    os._exit(code)


if __name__ == "__main__":
    run()
