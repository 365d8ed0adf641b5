"""A third-party gRPC client for Weft's L7 tests: grpcio, without generated code.

weft-demo's `weft.demo.Echo` service takes and returns raw bytes, so the generic
`unary_unary` call with no serializers reaches it. One channel (one HTTP/2 connection)
carries every call, as real gRPC clients do, so the mesh must route per request.

usage: grpc_client.py TARGET METHOD [--count N] [--metadata K=V]... [--message TEXT]
                      [--timeout SECONDS]

Prints one JSON line per call: {"code": "OK", "reply": "..."} or
{"code": "UNAVAILABLE", "details": "..."}; exits 0 whatever the codes (they are the result).
"""

import argparse
import json
import os
import sys

# The system resolver reads the pod's hosts file (the virtual cluster's DNS); grpcio's
# c-ares resolver might not.
os.environ.setdefault("GRPC_DNS_RESOLVER", "native")

import grpc  # noqa: E402  (after the resolver choice)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("target", help="host:port")
    parser.add_argument("method", help="Hello, Slow or a full /service/method path")
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument("--metadata", action="append", default=[], metavar="K=V")
    parser.add_argument("--message", default="hi")
    parser.add_argument("--timeout", type=float, default=10.0)
    args = parser.parse_args()

    path = args.method if args.method.startswith("/") else f"/weft.demo.Echo/{args.method}"
    metadata = []
    for item in args.metadata:
        key, sep, value = item.partition("=")
        if not sep:
            parser.error(f"metadata must be K=V, got {item!r}")
        metadata.append((key.lower(), value))

    # Proxy variables of the caller's environment must not divert the call.
    options = [("grpc.enable_http_proxy", 0)]
    with grpc.insecure_channel(args.target, options=options) as channel:
        call = channel.unary_unary(path)
        for _ in range(args.count):
            try:
                reply = call(
                    args.message.encode(), timeout=args.timeout, metadata=metadata or None
                )
                line = {"code": "OK", "reply": reply.decode("utf-8", "replace")}
            except grpc.RpcError as err:
                line = {"code": err.code().name, "details": err.details() or ""}
            print(json.dumps(line), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
