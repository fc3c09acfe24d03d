"""Trace context: OpenTelemetry, when it is installed (the ``otel`` extra).

A writing request's active span travels in ``event.context["traceparent"]``,
and each handler runs in a span linked to it. Without OpenTelemetry these
are no-ops, and nothing of it is imported.
"""
from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Any, ContextManager, Optional

try:
    from opentelemetry import trace
    from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
except ImportError:  # pragma: no cover - the otel extra is not installed
    trace = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from .events import Event

#: The context key under which a writer's span travels (W3C Trace Context).
TRACEPARENT = "traceparent"

_propagator = TraceContextTextMapPropagator() if trace is not None else None


def current_traceparent() -> Optional[dict[str, str]]:
    """``{"traceparent": ...}`` of the active span, or ``None`` when there is none."""
    if trace is None or _propagator is None or not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return {TRACEPARENT: carrier[TRACEPARENT]} if TRACEPARENT in carrier else None


def enabled() -> bool:
    """Whether handlers get spans: OpenTelemetry is installed and an SDK is configured.

    Asked once per batch: with the API alone, a span is a no-op that still
    costs about 20 µs per handler call, and finding the provider reads the
    environment.
    """
    return trace is not None and not isinstance(
        trace.get_tracer_provider(), (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
    )


def handler_span(event: Event, handler: str) -> ContextManager[Any]:
    """A span for one handler's call, linked to the writer's span when the event carries one."""
    if trace is None or _propagator is None:
        return contextlib.nullcontext()
    links = []
    traceparent = event.context.get(TRACEPARENT)
    if isinstance(traceparent, str):
        writer = trace.get_current_span(_propagator.extract({TRACEPARENT: traceparent})).get_span_context()
        if writer.is_valid:
            links.append(trace.Link(writer))
    return trace.get_tracer("flask_pgevents").start_as_current_span(
        f"pgevents {event.op} {event.table}",
        kind=trace.SpanKind.CONSUMER,
        links=links,
        attributes={
            "pgevents.event_id": event.id, "pgevents.handler": handler, "pgevents.attempt": event.attempt,
            "db.sql.table": event.table,
        },
    )
