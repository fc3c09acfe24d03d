"""tracing.py: the writer's span as W3C trace context, without a database or an SDK.

Spans of handlers linked to it run in tests/integration/test_tracing.py (they
need the SDK installed as the global tracer provider, which a process sets once)."""
from __future__ import annotations

from opentelemetry import trace

from flask_pgevents import tracing

WRITER = trace.SpanContext(
    trace_id=0x0AF7651916CD43DD8448EB211C80319C, span_id=0xB7AD6B7169203331, is_remote=False,
    trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
)


def test_the_active_span_travels_as_a_traceparent():
    with trace.use_span(trace.NonRecordingSpan(WRITER)):
        assert tracing.current_traceparent() == {
            tracing.TRACEPARENT: "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        }


def test_no_active_span_adds_nothing_to_the_context():
    assert tracing.current_traceparent() is None
    with trace.use_span(trace.INVALID_SPAN):
        assert tracing.current_traceparent() is None
