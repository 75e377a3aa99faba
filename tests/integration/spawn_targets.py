"""Targets the spawner tests start in child processes (``module:function``, called with spec).

They must import nothing heavy: the zygote preloads this module.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any


def exit_with(spec: dict[str, Any]) -> None:
    """Print one line to each stream, then exit with ``spec["code"]``."""
    print(f"out {spec.get('tag', '')}")
    print(f"err {spec.get('tag', '')}", file=sys.stderr)
    sys.exit(int(spec["code"]))


def kill_self(spec: dict[str, Any]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def raise_error(spec: dict[str, Any]) -> None:
    raise RuntimeError(f"boom {spec.get('tag', '')}")


def return_normally(spec: dict[str, Any]) -> None:
    return None


def wait_for_stdin_eof_or_signal(spec: dict[str, Any]) -> None:
    """Say hello, then block until a signal ends the process (the test kills it)."""
    print("running", flush=True)
    signal.pause()


def show_environment(spec: dict[str, Any]) -> None:
    """Print what the tests check: env vars, cwd, sys.path head, fds, signal state."""
    print(f"env {os.environ.get(spec['var'], '<unset>')}")
    print(f"env_keys {','.join(sorted(os.environ))}")
    print(f"cwd {Path.cwd()}")
    print(f"path0 {sys.path[0]}")
    print(f"fds {sorted(int(p.name) for p in Path('/proc/self/fd').iterdir())}")
    print(f"sigint {signal.getsignal(signal.SIGINT) == signal.SIG_DFL}")
    print(f"sigpipe {signal.getsignal(signal.SIGPIPE) == signal.SIG_DFL}")
    print(f"blocked {sorted(signal.pthread_sigmask(signal.SIG_BLOCK, []))}")
    print(f"sid {os.getsid(0) == os.getpid()}")
    import helper_module_for_sys_path  # type: ignore[import-not-found]

    print(f"imported {helper_module_for_sys_path.VALUE}")
