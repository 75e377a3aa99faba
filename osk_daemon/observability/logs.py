"""The daemon's own log: text for a terminal, JSON lines or logfmt for a log shipper.

Plugin output arrives here too (see ``supervisor.output``), as records of the logger
``osk.plugin.<name>`` carrying ``plugin``, ``instance`` and ``stream`` attributes, which
the JSON format turns into fields.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

_EXTRA_FIELDS = ("plugin", "instance", "stream")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for name in _EXTRA_FIELDS:
            if hasattr(record, name):
                data[name] = getattr(record, name)
        if record.exc_info:
            data["exc"] = self.formatException(record.exc_info)
        return json.dumps(data, default=str)


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text and not any(c in text for c in ' ="\\\n\t'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


class LogfmtFormatter(logging.Formatter):
    """``ts=... level=info logger=osk.daemon msg="..." plugin=echo instance=0``."""

    def format(self, record: logging.LogRecord) -> str:
        pairs: list[tuple[str, Any]] = [
            ("ts", f"{record.created:.6f}"),
            ("level", record.levelname.lower()),
            ("logger", record.name),
            ("msg", record.getMessage()),
        ]
        pairs += [(n, getattr(record, n)) for n in _EXTRA_FIELDS if hasattr(record, n)]
        if record.exc_info:
            pairs.append(("exc", self.formatException(record.exc_info)))
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in pairs)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__(
            "%(asctime)s.%(msecs)03d %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S"
        )


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the root logger once for the daemon process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    formatters = {"json": JsonFormatter, "logfmt": LogfmtFormatter}
    handler.setFormatter(formatters.get(fmt, TextFormatter)())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
