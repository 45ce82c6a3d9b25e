#!/usr/bin/env python3
"""A gRPC server for almond's tests (grpcio, no protobuf: bytes in, bytes out).

  server.py NAME [--fail CODE] [--delay SECONDS]

Binds 127.0.0.1:0 (h2c), prints "PORT <n>" and serves until stdin closes.
Methods of service almond.Test:
  Unary   answers b"NAME" with the status the request names (b"OK",
          b"UNAVAILABLE", ...): non-OK ones as trailers-only responses.
  Stream  sends one message b"NAME", then ends with the status the request
          names (so the status comes in trailers after a body).
--fail CODE answers every call with CODE (Stream: after its message).
--delay SECONDS waits that long before answering each call.
"""

import argparse
import sys
import threading
import time
from concurrent import futures

import grpc


def main():
    p = argparse.ArgumentParser()
    p.add_argument("name")
    p.add_argument("--fail", default=None)
    p.add_argument("--delay", type=float, default=0.0)
    args = p.parse_args()
    name = args.name.encode()

    def status_of(request):
        text = args.fail or request.decode("ascii", "replace") or "OK"
        return grpc.StatusCode[text]

    def unary(request, context):
        time.sleep(args.delay)
        context.set_trailing_metadata((("x-backend", args.name),))
        code = status_of(request)
        if code != grpc.StatusCode.OK:
            context.abort(code, f"{args.name}: {code.name}")
        return name

    def stream(request, context):
        time.sleep(args.delay)
        context.set_trailing_metadata((("x-backend", args.name),))
        code = status_of(request)
        yield name
        if code != grpc.StatusCode.OK:
            context.abort(code, f"{args.name}: {code.name}")

    handler = grpc.method_handlers_generic_handler(
        "almond.Test",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "Stream": grpc.unary_stream_rpc_method_handler(stream),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    # Serve until the test closes stdin (or kills this process).
    done = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        done.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    done.wait()
    server.stop(0)


if __name__ == "__main__":
    main()
