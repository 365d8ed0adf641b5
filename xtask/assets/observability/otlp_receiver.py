"""An OTLP/gRPC collector for Weft's tracing and access log tests: records every span and log
record it receives.

usage: otlp_receiver.py PORT OUT_FILE [--fail]

Serves `opentelemetry.proto.collector.trace.v1.TraceService/Export` and
`opentelemetry.proto.collector.logs.v1.LogsService/Export` over plaintext gRPC (grpcio, the
generated stubs of `opentelemetry-proto`) on 0.0.0.0:PORT and appends one JSON line per span or
log record to OUT_FILE, flushed as it is written:
  {"trace_id": hex, "span_id": hex, "parent_span_id": hex or "", "name": ...,
   "kind": "SPAN_KIND_CLIENT", "start": unix ns, "end": unix ns, "service": service.name,
   "attributes": {key: value}, "status": "STATUS_CODE_UNSET"}
  {"log": true, "time": unix ns, "service": service.name, "body": text or null,
   "attributes": {key: value}}
With --fail, every Export is answered UNAVAILABLE and nothing is recorded: a collector that is
down, whose spans the exporter must drop.

Prints `listening` once serving; runs until SIGTERM (or SIGINT), then stops the server.
"""

import argparse
import json
import signal
import threading
from concurrent import futures

import grpc
from opentelemetry.proto.collector.logs.v1 import logs_service_pb2, logs_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2


def value(any_value):
    """The Python value of an OTLP AnyValue: scalars unwrapped, arrays and maps recursively,
    bytes as hex; None when unset."""
    field = any_value.WhichOneof("value")
    if field == "array_value":
        return [value(v) for v in any_value.array_value.values]
    if field == "kvlist_value":
        return attributes(any_value.kvlist_value.values)
    if field == "bytes_value":
        return any_value.bytes_value.hex()
    return getattr(any_value, field) if field else None


def attributes(key_values):
    return {kv.key: value(kv.value) for kv in key_values}


def enum_name(enum, number):
    """The enum value's name; a number the proto does not define is kept visible as its
    digits rather than failing the whole Export."""
    try:
        return enum.Name(number)
    except ValueError:
        return str(number)


class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, out, fail):
        self.out = out
        self.fail = fail
        # Exports are served on several threads; one request's spans stay together.
        self.lock = threading.Lock()

    def Export(self, request, context):
        if self.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "otlp_receiver started with --fail")
        with self.lock:
            for resource_spans in request.resource_spans:
                service = attributes(resource_spans.resource.attributes).get("service.name")
                for scope_spans in resource_spans.scope_spans:
                    for span in scope_spans.spans:
                        record = {
                            "trace_id": span.trace_id.hex(),
                            "span_id": span.span_id.hex(),
                            "parent_span_id": span.parent_span_id.hex(),
                            "name": span.name,
                            "kind": enum_name(trace_pb2.Span.SpanKind, span.kind),
                            "start": span.start_time_unix_nano,
                            "end": span.end_time_unix_nano,
                            "service": service,
                            "attributes": attributes(span.attributes),
                            "status": enum_name(trace_pb2.Status.StatusCode, span.status.code),
                        }
                        self.out.write(json.dumps(record) + "\n")
                        self.out.flush()
        # An empty response (no partial_success) accepts every span.
        return trace_service_pb2.ExportTraceServiceResponse()


class LogsReceiver(logs_service_pb2_grpc.LogsServiceServicer):
    def __init__(self, spans):
        # Shares the span receiver's output, lock and failure mode.
        self.spans = spans

    def Export(self, request, context):
        if self.spans.fail:
            context.abort(grpc.StatusCode.UNAVAILABLE, "otlp_receiver started with --fail")
        with self.spans.lock:
            for resource_logs in request.resource_logs:
                service = attributes(resource_logs.resource.attributes).get("service.name")
                for scope_logs in resource_logs.scope_logs:
                    for record in scope_logs.log_records:
                        line = {
                            "log": True,
                            "time": record.time_unix_nano,
                            "service": service,
                            "body": value(record.body) if record.HasField("body") else None,
                            "attributes": attributes(record.attributes),
                        }
                        self.spans.out.write(json.dumps(line) + "\n")
                        self.spans.out.flush()
        return logs_service_pb2.ExportLogsServiceResponse()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("port", type=int)
    parser.add_argument("out_file", help="appended to, one JSON line per span")
    parser.add_argument("--fail", action="store_true", help="answer every Export UNAVAILABLE")
    args = parser.parse_args()

    with open(args.out_file, "a", encoding="utf-8") as out:
        # Without SO_REUSEPORT (grpcio's default), a port still held by another receiver is
        # an error here, not a listener that silently shares the spans.
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=4), options=[("grpc.so_reuseport", 0)]
        )
        receiver = Receiver(out, args.fail)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(receiver, server)
        logs_service_pb2_grpc.add_LogsServiceServicer_to_server(LogsReceiver(receiver), server)
        server.add_insecure_port(f"0.0.0.0:{args.port}")
        # Stopping from the handler ends wait_for_termination below; in-flight Exports get a
        # second to finish, so no line is cut short.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: server.stop(grace=1))
        server.start()
        print("listening", flush=True)
        server.wait_for_termination()


if __name__ == "__main__":
    main()
