"""OpenTelemetry traces: one trace from a caller through the daemon into the plugin.

Theory of operation
-------------------
Off by default (``[tracing] exporter = "none"``): then nothing here is imported on the
hot path and a call costs nothing more. When on:

- The broker opens a span per call (``osk.rpc echo.echo``), a child of the caller's
  span when the request's header carries a W3C ``traceparent``, and forwards the call
  with its own ``traceparent`` in the header's ``meta``; the span ends when the call is
  answered (status error for an error answer, a timeout or ``unavailable``).
- The worker, seeing a ``traceparent`` in a request's header, opens ``osk.handle echo``
  as a child of the broker's span around the handler.
- The supervisor opens ``osk.restart echo/0`` from a crash to the replacement's
  readiness, and the rollout driver ``osk.rollout counter`` for a whole swap.

Exporters: ``console`` (JSON on stdout; a plugin's lands in the daemon's log), ``file``
(one JSON object per span per line, appended by the daemon and by every plugin process
that may write there; a sandboxed plugin usually may not, see the README), and ``otlp``
(``opentelemetry-exporter-otlp``, when installed; its usual environment variables).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

log = logging.getLogger("osk.tracing")

__all__ = ["EXPORTERS", "JsonLinesExporter", "RpcTracer", "make_provider"]

EXPORTERS = ("none", "console", "file", "otlp")
_PROPAGATOR = TraceContextTextMapPropagator()


class JsonLinesExporter(SpanExporter):
    """Appends one JSON line per span to ``path`` (short lines, one write each)."""

    def __init__(self, path: str, service: str) -> None:
        self._path = path
        self._service = service
        self._lock = threading.Lock()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        lines = []
        for span in spans:
            ctx = span.get_span_context()
            parent = span.parent
            lines.append(
                json.dumps(
                    {
                        "service": self._service,
                        "name": span.name,
                        "trace_id": f"{ctx.trace_id:032x}" if ctx else None,
                        "span_id": f"{ctx.span_id:016x}" if ctx else None,
                        "parent_id": f"{parent.span_id:016x}" if parent else None,
                        "kind": span.kind.name,
                        "start_ns": span.start_time,
                        "end_ns": span.end_time,
                        "status": span.status.status_code.name,
                        "attributes": dict(span.attributes or {}),
                        "pid": os.getpid(),
                    },
                    default=str,
                )
                + "\n"
            )
        try:
            with self._lock:
                fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, "".join(lines).encode())
                finally:
                    os.close(fd)
        except OSError as exc:
            log.warning("cannot write spans to %s: %s", self._path, exc)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make_provider(
    exporter: str, service: str, file: str | None = None, sample_ratio: float = 1.0
) -> TracerProvider | None:
    """A provider exporting as configured, or None for ``none``. Raises ValueError for an
    unknown exporter or ``otlp`` without its package."""
    if exporter == "none":
        return None
    resource = Resource.create({"service.name": service})
    provider = TracerProvider(resource=resource, sampler=TraceIdRatioBased(sample_ratio))
    if exporter == "console":
        provider.add_span_processor(SimpleSpanProcessor(ConsoleSpanExporter()))
    elif exporter == "file":
        if not file:
            raise ValueError("tracing.file: the file exporter needs a path")
        provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(file, service)))
    elif exporter == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # type: ignore[import-not-found]
                OTLPSpanExporter,
            )
        except ImportError as exc:
            raise ValueError(
                "tracing.exporter: otlp needs the opentelemetry-exporter-otlp package"
            ) from exc
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    else:
        raise ValueError(f"tracing.exporter: must be one of {', '.join(EXPORTERS)}")
    return provider


class RpcTracer:
    """Spans for calls through the broker, restarts and rollouts (daemon side)."""

    def __init__(self, provider: TracerProvider) -> None:
        self.provider = provider
        self._tracer = provider.get_tracer("osk_daemon")

    def begin_call(
        self, target: str, method: str, meta: Mapping[str, Any] | None
    ) -> tuple[Span, dict[str, Any]]:
        """The call's span (child of the caller's ``traceparent``) and the meta to forward."""
        carrier = (
            {"traceparent": str(meta["traceparent"])} if meta and "traceparent" in meta else {}
        )
        parent = _PROPAGATOR.extract(carrier) if carrier else None
        span = self._tracer.start_span(
            f"osk.rpc {target}.{method}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={"osk.plugin": target, "osk.method": method},
        )
        forwarded: dict[str, str] = {}
        _PROPAGATOR.inject(forwarded, context=trace.set_span_in_context(span))
        return span, {**(meta or {}), **forwarded}

    @staticmethod
    def end_call(span: Span, ok: bool, where: str = "") -> None:
        if where:
            span.set_attribute("osk.instance", where)
        if not ok:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def begin(self, name: str, **attributes: Any) -> Span:
        return self._tracer.start_span(name, attributes=attributes)

    def shutdown(self) -> None:
        self.provider.shutdown()


def handle_span(tracer: Any, method: str, meta: Mapping[str, Any]) -> Span:
    """Worker side: the handler's span, a child of the broker's (from ``meta``)."""
    parent = _PROPAGATOR.extract({"traceparent": str(meta["traceparent"])})
    span: Span = tracer.start_span(f"osk.handle {method}", context=parent, kind=SpanKind.SERVER)
    return span
