"""Removing files off the daemon's loop.

Why: an unlink costs ~6 us on tmpfs, but 75 us to several milliseconds on a disk-backed
runtime dir (ext4 here: 1-4.5 ms measured during version swaps, waiting on the journal),
and every broker call waits while the loop does it. A life's output FIFOs and heartbeat
page go when it ends, and nothing needs them gone at once.

How: ``remove(path)`` hands the unlink to one thread of the daemon's (started on first
use; the zygote never imports this module); ``flush()`` waits until what was handed so
far is done (at shutdown, and for tests). A path that is already gone is fine.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

__all__ = ["flush", "remove"]

_pool = ThreadPoolExecutor(1, thread_name_prefix="osk-unlink")


def _unlink(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.unlink()


def remove(path: Path) -> None:
    """Unlink ``path`` soon, on the unlink thread."""
    _pool.submit(_unlink, path)


def flush() -> None:
    """Return once every removal handed over so far is done."""
    _pool.submit(lambda: None).result()
