#!/usr/bin/env python3
"""A do-nothing OTLP/HTTP receiver for the tracing benchmark: answers every
POST with 200 (an empty ExportTraceServiceResponse) and counts requests and
bytes, printed on SIGTERM/SIGINT. Usage: otlp-sink.py [PORT] (default 14318).
Run it off the proxy's core: taskset -c 0 python3 otlp-sink.py"""
import signal
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

stats = {"requests": 0, "bytes": 0}


class Sink(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_POST(self):
        n = int(self.headers.get("content-length", "0"))
        self.rfile.read(n)
        stats["requests"] += 1
        stats["bytes"] += n
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


def stop(*_):
    print(f"otlp-sink: {stats['requests']} export requests, {stats['bytes']} bytes", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
signal.signal(signal.SIGINT, stop)
port = int(sys.argv[1]) if len(sys.argv) > 1 else 14318
ThreadingHTTPServer(("127.0.0.1", port), Sink).serve_forever()
