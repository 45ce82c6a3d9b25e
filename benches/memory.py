#!/usr/bin/env python3
"""Memory per idle client connection, and after a burst closes (issue 15).

Starts `BINARY proxy` on a config with one host-routed listener, opens N
HTTP/1.1 keep-alive connections to it, sends one request on each
(`Host: nosuch`, answered 404 by the proxy itself: no backend needed),
keeps them open, then closes them all; reads the proxy's VmRSS before, with
the connections open, and 1 s and 10 s after they close. With `h2`, the
connections are HTTP/2 ones (the preface and the settings exchanged, no
request).

    python3 benches/memory.py target/release/almond [N] [h2]

Reported, never asserted. Needs `ulimit -n` above N + 100.
"""
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    binary = sys.argv[1]
    n = int(sys.argv[2]) if len(sys.argv) > 2 else 5000
    h2 = len(sys.argv) > 3 and sys.argv[3] == "h2"
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1000)), hard))
    port, admin = free_port(), free_port()
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(
        f"admin: 127.0.0.1:{admin}\n"
        f"listeners:\n  - bind: 127.0.0.1:{port}\n"
        "limits:\n  max_connections: 100000\n"
        "services:\n  web:\n    endpoints: [{ addr: '127.0.0.1:9' }]\n"
    )
    config.close()
    proxy = subprocess.Popen(
        [binary, "proxy", "--config", config.name],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(1)
        before = rss_kib(proxy.pid)
        conns = []
        request = b"GET / HTTP/1.1\r\nHost: nosuch\r\n\r\n"
        if h2:
            # The preface, an empty SETTINGS and the ACK of the server's.
            request = (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
                       + bytes([0, 0, 0, 4, 0, 0, 0, 0, 0])
                       + bytes([0, 0, 0, 4, 1, 0, 0, 0, 0]))
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port))
            s.sendall(request)
            conns.append(s)
        for s in conns:
            if h2:
                # The server's SETTINGS, and its ACK of the client's.
                data = b""
                while len(data) < 9:
                    data += s.recv(4096)
                continue
            data = b""
            while b"\r\n\r\n" not in data:
                data += s.recv(4096)
            head, _, rest = data.partition(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            while len(rest) < length:
                rest += s.recv(4096)
        time.sleep(1)
        held = rss_kib(proxy.pid)
        for s in conns:
            s.close()
        time.sleep(1)
        after1 = rss_kib(proxy.pid)
        time.sleep(9)
        after10 = rss_kib(proxy.pid)
        per = (held - before) * 1024 / n
        print(f"{os.path.basename(binary)}: RSS before {before / 1024:.1f} MiB, "
              f"with {n} idle {'HTTP/2' if h2 else 'HTTP/1.1'} connections {held / 1024:.1f} MiB "
              f"({per / 1000:.1f} KB per connection), "
              f"1 s after closing {after1 / 1024:.1f} MiB, 10 s after {after10 / 1024:.1f} MiB")
    finally:
        proxy.terminate()
        proxy.wait()
        os.unlink(config.name)


if __name__ == "__main__":
    main()
