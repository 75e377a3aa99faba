"""A zygote warm-up hook for the spawner tests, and a target of the same module.

``warm_up`` opens a pipe in each warm child, as the worker runtime's hook makes its zmq
context and event loop; ``show_warm_up`` reports whether it found that pipe open and
made in its own process. Imports nothing heavy: the zygote preloads this module.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

_pipe: tuple[int, int, int] | None = None  # (pid, read fd, write fd)


def warm_up() -> tuple[frozenset[int], Callable[[], None]]:
    global _pipe
    r, w = os.pipe()
    _pipe = (os.getpid(), r, w)

    def release() -> None:
        os.close(r)
        os.close(w)

    return frozenset({r, w}), release


def show_warm_up(spec: dict[str, Any]) -> None:
    """Print whether this process's warm-up pipe is still open, and the open fds."""
    if _pipe is not None and _pipe[0] == os.getpid():
        os.write(_pipe[2], b"x")
        print(f"pipe {os.read(_pipe[1], 1)!r}")
        print(f"kept {sorted(_pipe[1:])}")
    else:
        print("pipe none")
    print(f"fds {sorted(int(p.name) for p in Path('/proc/self/fd').iterdir())}")
