"""A plugin module whose Nth import fails on purpose, to test what a failed standby does.

``OSK_IMPORT_COUNT`` names a file that gets one byte per import of this module (in any
process); the import whose number is ``OSK_FAIL_IMPORT`` raises.
"""

from __future__ import annotations

import os
from pathlib import Path

from testplugins import Echo

_counter = os.environ.get("OSK_IMPORT_COUNT")
if _counter:
    with Path(_counter).open("ab") as _f:
        _f.write(b"x")
    _n = Path(_counter).stat().st_size
    if _n == int(os.environ.get("OSK_FAIL_IMPORT", "0")):
        raise ImportError(f"import number {_n} fails on purpose")


class Flaky(Echo):
    pass
