"""cgroupfs: the file helpers every cgroup access goes through, and where the host mounts it.

Why: the kernel's cgroup interface is a filesystem with quirks (one value per ``write(2)``,
``max`` for unlimited, EBUSY on rmdir while tasks finish exiting), and an ``OSError`` from
it says nothing about which file failed. Both backends (``cgroup_v1``, ``cgroup_v2``) and
the shared code in ``cgroups`` use the helpers here, which turn ``OSError`` into
``CgroupError`` naming the file and the errno.

How: the file helpers (``read_text``, ``write_value``, ``remove_tree``, ...) do the I/O;
the layout half is pure: ``parse_mountinfo`` reads ``/proc/self/mountinfo`` text (where each
hierarchy is mounted), ``parse_proc_cgroup`` reads ``/proc/self/cgroup`` text (where this
process sits in each), and ``read_layout`` combines them into a ``HostLayout``. Nothing is
read at import time.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import resource
import signal
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from osk_daemon.errors import CgroupError

__all__ = [
    "POLL_S",
    "HostLayout",
    "KeptFiles",
    "Mount",
    "children",
    "make_dir",
    "parse_mountinfo",
    "parse_proc_cgroup",
    "procs_of",
    "read_int",
    "read_keyed",
    "read_layout",
    "read_optional",
    "read_text",
    "remove_tree",
    "signal_all",
    "translate",
    "write_value",
]

POLL_S = 0.005


# ---- file access ------------------------------------------------------------------------


@contextmanager
def translate(action: str, path: str | Path) -> Iterator[None]:
    """Turn an ``OSError`` from a cgroup file into ``CgroupError`` naming file and errno."""
    try:
        yield
    except OSError as exc:
        code = exc.errno or 0
        name = errno.errorcode.get(code, str(code))
        raise CgroupError(
            f"cannot {action} {path}: {os.strerror(code)} ({name})", str(path), code
        ) from exc


def read_text(path: Path) -> str:
    with translate("read", path):
        return path.read_text()


def read_optional(path: str | Path) -> str | None:
    """The file's text, or ``None`` if it (or its cgroup) does not exist.

    Plain ``os.open``/``os.read``: usage sampling reads several files per instance, and a
    ``Path.read_text`` (a buffered text file object per read) costs several times more."""
    fd = _open_optional(path)
    if fd is None:
        return None
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
    except OSError as exc:
        with translate("read", path):
            raise exc
    finally:
        os.close(fd)
    return b"".join(chunks).decode()


def _open_optional(path: str | Path) -> int | None:
    """An fd of the file for reading, or ``None`` if it (or its cgroup) does not exist."""
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as exc:
        with translate("read", path):
            raise exc


def write_value(path: Path, value: str) -> None:
    """One ``write(2)`` of ``value``: cgroup files take one value (one pid) per write."""
    with translate(f"write {value!r} to", path):
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)


def read_int(path: str | Path) -> int | None:
    """An integer file (``max`` reads as ``None``); ``None`` if the file is missing."""
    return _parse_int(read_optional(path))


def read_keyed(path: str | Path) -> dict[str, int] | None:
    """A flat keyed file (``key value`` lines, e.g. ``memory.events``); ``None`` if missing."""
    return _parse_keyed(read_optional(path))


def _parse_int(text: str | None) -> int | None:
    if text is None or text.strip() == "max":
        return None
    return int(text.split()[0])


def _parse_keyed(text: str | None) -> dict[str, int] | None:
    if text is None:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


class KeptFiles:
    """Counter files of one cgroup, kept open and re-read with ``pread`` at offset 0.

    Why: usage sampling reads seven files of each of 25 cgroups a second. An ``open`` of
    a cgroup file costs ~7 us on this VM, a ``pread`` on a kept fd 0.8 us, and a read at
    offset 0 makes the kernel render the values afresh; sampling was about half of an
    idle daemon's CPU at 500 plugins (0.35 of 0.7 % of a core).

    Owned by the daemon's loop thread. ``close`` before the cgroup goes to the thread that
    removes it; after that every read is a plain one (open, read, close). All instances
    together keep at most a quarter of the soft ``RLIMIT_NOFILE`` open: past that, reads
    are plain too, so sampling never takes the fds that spawns need.
    """

    _kept = 0  # fds kept open by every KeptFiles of this process
    _budget: int | None = None

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}
        self._closed = False

    def read(self, path: str) -> str | None:
        """The file's text now, or ``None`` if it (or its cgroup) does not exist."""
        fd = self._fds.get(path)
        if fd is None:
            if self._closed or KeptFiles._kept >= KeptFiles._limit():
                return read_optional(path)
            fd = _open_optional(path)
            if fd is None:
                return None
            self._fds[path] = fd
            KeptFiles._kept += 1
        try:
            return os.pread(fd, 65536, 0).decode()
        except OSError:  # the cgroup was removed under the fd: forget it, read plainly
            self._forget(path)
            return read_optional(path)

    def read_int(self, path: str) -> int | None:
        return _parse_int(self.read(path))

    def read_keyed(self, path: str) -> dict[str, int] | None:
        return _parse_keyed(self.read(path))

    def close(self) -> None:
        """Close every kept fd; later reads are plain ones."""
        self._closed = True
        for path in list(self._fds):
            self._forget(path)

    def __del__(self) -> None:
        # a cgroup object dropped without close (e.g. one ``Cgroups.close`` swept by name):
        # nobody else can read through it, so its fds go with it, as a socket's would
        with contextlib.suppress(Exception):
            self.close()

    def _forget(self, path: str) -> None:
        fd = self._fds.pop(path)
        KeptFiles._kept -= 1
        with contextlib.suppress(OSError):
            os.close(fd)

    @staticmethod
    def _limit() -> int:
        if KeptFiles._budget is None:
            KeptFiles._budget = resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4
        return KeptFiles._budget


def make_dir(path: Path, exist_ok: bool = False) -> None:
    with translate("create cgroup", path):
        path.mkdir(exist_ok=exist_ok)


def procs_of(path: Path) -> list[int]:
    """Pids in the cgroup at ``path`` and all its descendants; missing cgroups are empty."""
    pids: list[int] = []
    text = read_optional(path / "cgroup.procs")
    if text is None:
        return pids
    pids.extend(int(p) for p in text.split())
    for child in _subdirs(path):
        pids.extend(procs_of(child))
    return pids


def _subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except FileNotFoundError:
        return []


def children(path: Path) -> list[str]:
    """Names of the child cgroups of ``path`` (none if it does not exist)."""
    return sorted(p.name for p in _subdirs(path))


def remove_tree(path: Path, deadline: float) -> None:
    """rmdir ``path`` and any child cgroups, deepest first; retry EBUSY until ``deadline``.

    The caller has killed the processes: EBUSY here only means tasks still finishing exit.
    """
    for child in _subdirs(path):
        remove_tree(child, deadline)
    while True:
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() >= deadline:
                with translate("remove cgroup", path):
                    raise
        time.sleep(POLL_S)


def signal_all(pids: Sequence[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# ---- host layout ------------------------------------------------------------------------


@dataclass(frozen=True)
class Mount:
    """One line of ``/proc/self/mountinfo`` for a cgroup filesystem."""

    root: str  # the path inside the hierarchy that is mounted at ``point``
    point: Path
    fstype: str  # "cgroup" or "cgroup2"
    options: frozenset[str]  # super options: for v1, the controllers ("memory", "name=x")


def _unescape(field: str) -> str:
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """The cgroup and cgroup2 mounts listed in a ``/proc/<pid>/mountinfo`` text."""
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3 or tail[0] not in ("cgroup", "cgroup2"):
            continue
        options = frozenset(tail[2].split(","))
        mounts.append(Mount(_unescape(fields[3]), Path(_unescape(fields[4])), tail[0], options))
    return mounts


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """Controller -> path from a ``/proc/<pid>/cgroup`` text; the v2 entry has key ``""``.

    A co-mounted hierarchy (``2:cpu,cpuacct:/x``) gives one key per controller.
    """
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hier_id, controllers, path = parts
        if hier_id == "0" and controllers == "":
            out[""] = path
        else:
            for name in controllers.split(","):
                out[name] = path
    return out


def _dir_in(mount: Mount, path: str) -> Path | None:
    root = mount.root.rstrip("/")
    if path != root and not path.startswith(root + "/"):
        return None  # our cgroup is outside what this mount shows
    return mount.point / path[len(root) :].lstrip("/")


@dataclass(frozen=True)
class HostLayout:
    """Where this process's cgroups are: the v2 directory and each v1 controller's."""

    unified: Path | None
    v1: dict[str, Path] = field(default_factory=dict)


def read_layout(mountinfo: str, proc_cgroup: str) -> HostLayout:
    """Combine mountinfo and /proc/self/cgroup texts into directories (no I/O)."""
    mounts = parse_mountinfo(mountinfo)
    paths = parse_proc_cgroup(proc_cgroup)
    unified: Path | None = None
    if "" in paths:
        for m in mounts:
            if m.fstype == "cgroup2" and (d := _dir_in(m, paths[""])) is not None:
                unified = d
                break
    v1: dict[str, Path] = {}
    for controller, path in paths.items():
        if not controller:
            continue
        for m in mounts:
            if m.fstype == "cgroup" and controller in m.options:
                d = _dir_in(m, path)
                if d is not None:
                    v1[controller] = d
                    break
    return HostLayout(unified, v1)
