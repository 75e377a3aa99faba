"""Run by ``test_sibling_fork``: fork a sibling (our parent's child) and report on it.

This process plays the zygote. It forks one child with ``fork_sibling`` and writes one
JSON line to the fd in ``argv[1]``: ``{"parent": ..., "child": ...}``, where the child's
line is written by the child itself before it exits with code 7 (the test, its parent,
reaps it).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading

from osk_daemon.supervisor import sibling


def _child_report(hooks: list[str]) -> dict[str, object]:
    s = sibling._loaded()
    assert not isinstance(s, str)
    tid_record = ctypes.c_int.from_address(sibling._tid_address(s)).value
    seen: list[str] = []
    thread = threading.Thread(target=lambda: seen.append(str(threading.get_native_id())))
    thread.start()
    thread.join(5)
    lock = threading.RLock()
    with lock, lock:
        reentered = True
    head, _ = sibling._robust_list(s)
    return {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "tid_record": tid_record,
        "thread_ran": bool(seen) and seen[0] != str(os.getpid()),
        "reentered": reentered,
        "hooks": hooks,
        "robust_list": head != 0,
    }


def main() -> None:
    out = int(sys.argv[1])
    hooks: list[str] = []
    os.register_at_fork(
        before=lambda: hooks.append("before"),
        after_in_parent=lambda: hooks.append("parent"),
        after_in_child=lambda: hooks.append("child"),
    )
    head, _ = sibling._robust_list(sibling._loaded())  # type: ignore[arg-type]
    pid = sibling.fork_sibling()
    if pid == 0:
        os.write(out, json.dumps({"child": _child_report(hooks)}).encode() + b"\n")
        os._exit(7)
    parent = {"pid": os.getpid(), "child": pid, "hooks": hooks, "robust_list": head != 0}
    os.write(out, json.dumps({"parent": parent}).encode() + b"\n")


if __name__ == "__main__":
    main()
