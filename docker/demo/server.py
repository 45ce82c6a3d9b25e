"""The demo service of docker/compose.yaml: one version of `demo`.

Answers every GET with one line naming its version and host, over HTTP/1.1
with keep-alive (so the proxy's connection pool is used as in production).
`/health` always answers 200: it is what Consul's check calls.

Environment:
  VERSION        the version it reports (v1, v2, ...)
  HOST_NAME      the "host" it runs on (host1, host2)
  PORT           the port to listen on (all addresses)
  FAIL_PERCENT   percent of requests (not /health) answered 500, default 0:
                 a bad release for the watcher to roll back
  LATENCY_MS     extra time per request in milliseconds, default 0
"""

import http.server
import os
import random
import time

VERSION = os.environ.get("VERSION", "v1")
HOST_NAME = os.environ.get("HOST_NAME", "host")
PORT = int(os.environ.get("PORT", "8080"))
FAIL_PERCENT = float(os.environ.get("FAIL_PERCENT", "0") or 0)
LATENCY = float(os.environ.get("LATENCY_MS", "0") or 0) / 1000.0


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; every answer has a length
    server_version = "almond-demo"

    def do_GET(self):
        if self.path == "/health":
            self.answer(200, "ok\n")
            return
        if LATENCY:
            time.sleep(LATENCY)
        if random.uniform(0, 100) < FAIL_PERCENT:
            self.answer(500, f"demo {VERSION} on {HOST_NAME}: injected failure\n")
        else:
            self.answer(200, f"demo {VERSION} on {HOST_NAME}\n")

    do_HEAD = do_GET

    def answer(self, status, text):
        body = text.encode()
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, *args):
        pass  # one line per request would drown the compose logs


if __name__ == "__main__":
    server = http.server.ThreadingHTTPServer(("", PORT), Handler)
    server.daemon_threads = True
    print(f"demo {VERSION} on {HOST_NAME} listening on :{PORT}", flush=True)
    server.serve_forever()
