"""OpenTelemetry tracing, optional: one trace per request across gateway -> LLM -> encoder.

Off unless a service is given `--otlp-endpoint` (or, in tests, an exporter); then this
module imports the OpenTelemetry SDK (the `tracing` extra) and exports spans over OTLP.
Off, nothing imports opentelemetry and every `span()` is a no-op context manager.

The trace context crosses each gRPC link as W3C `traceparent` metadata: the client
interceptors (`client_interceptors`) inject the current context, the server interceptor
(`ServerTracing`) opens the call's server span as its child. Inside a service, `span(name)`
opens a child of whatever span is current in this task (fetch, preprocess, tower, transfer;
prefill, decode), using the tracer of the service that serves the call.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc

# Health checks and reflection are polled: a span each would drown the requests.
UNTRACED_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.")

# The tracer of the service handling the current request (None: tracing off, no spans).
_tracer: contextvars.ContextVar[Any] = contextvars.ContextVar("mmserve_tracer", default=None)


class Tracing:
    """One service's tracer; `Tracing.off()` when no endpoint is configured."""

    def __init__(self, tracer: Any = None, provider: Any = None) -> None:
        self.tracer = tracer
        self._provider = provider

    @classmethod
    def off(cls) -> Tracing:
        return cls()

    @classmethod
    def configure(cls, service_name: str, otlp_endpoint: str | None,
                  exporter: Any = None) -> Tracing:
        """Tracing to `otlp_endpoint` (host:port of an OTLP/gRPC collector), or to
        `exporter` (a SpanExporter, e.g. the SDK's in-memory one); off with neither."""
        if not otlp_endpoint and exporter is None:
            return cls.off()
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor
        except ImportError as exc:
            raise ValueError("--otlp-endpoint needs the tracing extra: "
                             "pip install 'mmserve[tracing]'") from exc
        provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is not None:
            provider.add_span_processor(SimpleSpanProcessor(exporter))
        else:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            provider.add_span_processor(BatchSpanProcessor(
                OTLPSpanExporter(endpoint=otlp_endpoint, insecure=True)))
        return cls(provider.get_tracer("mmserve"), provider)

    @property
    def enabled(self) -> bool:
        return self.tracer is not None

    @contextlib.contextmanager
    def request(self, name: str, carrier: dict[str, str] | None = None,
                **attributes: Any) -> Iterator[None]:
        """The root span of a request in this service, continuing the trace in `carrier`
        (W3C traceparent/tracestate) when there is one."""
        if self.tracer is None:
            yield
            return
        from opentelemetry.propagate import extract

        # Set, not reset: each call and request runs in its own task (its own context).
        _tracer.set(self.tracer)
        with self.tracer.start_as_current_span(name, context=extract(carrier or {}),
                                               attributes=attributes or None):
            yield

    def shutdown(self) -> None:
        """Flushes what is buffered to the collector."""
        if self._provider is not None:
            self._provider.shutdown()


@contextlib.contextmanager
def span(name: str, **attributes: Any) -> Iterator[None]:
    """A child span of the current one; nothing when the request is not traced."""
    tracer = _tracer.get()
    if tracer is None:
        yield
        return
    with tracer.start_as_current_span(name, attributes=attributes or None):
        yield


def record_span(name: str, start_ns: int, **attributes: Any) -> None:
    """A child span of the current one from `start_ns` (time.time_ns()) to now: for work
    that spans yields of a stream, where a current span would leak into the consumer."""
    tracer = _tracer.get()
    if tracer is not None:
        tracer.start_span(name, start_time=start_ns, attributes=attributes or None).end()


def inject() -> list[tuple[str, str]]:
    """The current trace context as gRPC metadata pairs; empty when not traced."""
    if _tracer.get() is None:
        return []
    from opentelemetry.propagate import inject as otel_inject

    carrier: dict[str, str] = {}
    otel_inject(carrier)
    return list(carrier.items())


class ServerTracing(grpc.aio.ServerInterceptor):
    """Opens each call's server span, continuing the caller's trace from its metadata."""

    def __init__(self, tracing: Tracing, service: str) -> None:
        self._tracing = tracing
        self._service = service

    async def intercept_service(
            self, continuation: Callable[[grpc.HandlerCallDetails],
                                         Awaitable[grpc.RpcMethodHandler]],
            details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or details.method.startswith(UNTRACED_PREFIXES):
            return handler
        carrier = {key: value for key, value in details.invocation_metadata or ()
                   if key in ("traceparent", "tracestate") and isinstance(value, str)}
        name = f"{self._service} {details.method.rsplit('/', 1)[-1]}"
        tracing = self._tracing
        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                with tracing.request(name, carrier, **{"rpc.method": details.method}):
                    return await behavior(request, context)
            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer,
                                                       handler.response_serializer)
        if handler.unary_stream is not None:
            stream_behavior = handler.unary_stream

            async def stream(request: Any, context: grpc.aio.ServicerContext
                             ) -> AsyncIterator[Any]:
                with tracing.request(name, carrier, **{"rpc.method": details.method}):
                    async for response in stream_behavior(request, context):
                        yield response
            return grpc.unary_stream_rpc_method_handler(stream, handler.request_deserializer,
                                                        handler.response_serializer)
        return handler


def _with_context(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
    pairs = inject()
    if not pairs:
        return details
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    for key, value in pairs:
        metadata[key] = value
    return details._replace(metadata=metadata)


class _UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_context(details), request)


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation: Any, details: Any, request: Any) -> Any:
        return await continuation(_with_context(details), request)


def client_interceptors(enabled: bool) -> list[grpc.aio.ClientInterceptor]:
    """Interceptors that send the current trace context; none when tracing is off."""
    return [_UnaryUnary(), _UnaryStream()] if enabled else []
