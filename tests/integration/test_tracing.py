"""Trace context: with OpenTelemetry, a writing request's span travels in
event.context["traceparent"], and each handler runs in a span linked to it."""
from __future__ import annotations

from typing import Any

import pytest
from conftest import thing_app
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

_exporter = InMemorySpanExporter()


@pytest.fixture(scope="module")
def spans() -> Any:
    """The SDK's in-memory exporter, installed once as the global tracer provider."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(_exporter))
    trace.set_tracer_provider(provider)
    return _exporter


def test_the_writer_span_travels_to_a_linked_handler_span(make_app, recorder, spans):
    spans.clear()
    app, db, pgevents, Thing = thing_app(make_app)
    pgevents.listen(Thing, "after_insert", recorder)
    writer: list[Any] = []

    @app.post("/")
    def create() -> str:
        with trace.get_tracer("test").start_as_current_span("POST /") as span:
            writer.append(span.get_span_context())
            db.session.add(Thing(name="traced"))
            db.session.commit()
        return "ok"

    with app.app_context():
        pgevents.install_triggers()
        app.test_client().post("/")
        db.session.add(Thing(name="untraced"))  # no span, no request
        db.session.commit()
        assert pgevents.process_pending() == 2
        db.session.remove()
    traced, untraced = recorder.events
    [context] = writer
    assert traced.context["traceparent"].startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
    assert "traceparent" not in untraced.context
    handled = [span for span in spans.get_finished_spans() if span.name == "pgevents insert public.thing"]
    assert len(handled) == 2
    first, second = handled
    assert [link.context.span_id for link in first.links] == [context.span_id]
    assert first.context.trace_id != context.trace_id  # a new trace, linked: not a child
    assert first.attributes["pgevents.event_id"] == traced.id
    assert first.attributes["pgevents.handler"] == "conftest.Recorder"
    assert list(second.links) == []
