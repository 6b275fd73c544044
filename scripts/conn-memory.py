#!/usr/bin/env python3
"""Resident memory per downstream connection of a running Strait (BENCHMARKS.md, "Memory").

Starts `strait run` on a generated config (one route to a small keep-alive HTTP backend run by
this script), opens N client connections that send nothing, and reports the RSS growth per
connection; then sends one request on M of them (keep-alive) and reports the growth per used
connection. Everything is on 127.0.0.1 with ports chosen by the kernel; the script ends only the
processes it started.

    cargo build --release && python3 scripts/conn-memory.py [--n 10000] [--m 1000]
"""

import argparse
import http.server
import os
import resource
import socket
import subprocess
import sys
import tempfile
import threading
import time


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def settle(pid, seconds=1.0):
    """RSS once it has stopped moving (bounded wait)."""
    deadline = time.monotonic() + 10
    last = rss_kib(pid)
    while time.monotonic() < deadline:
        time.sleep(seconds)
        now = rss_kib(pid)
        if now == last:
            return now
        last = now
    return last


class Backend(http.server.ThreadingHTTPServer):
    request_queue_size = 1024


class Hello(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in two writes: without this, Nagle + delayed ACK add 40 ms.
    disable_nagle_algorithm = True

    def do_GET(self):
        body = b"Hello, World!"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strait", default="target/release/strait")
    ap.add_argument("--n", type=int, default=10000, help="idle connections")
    ap.add_argument("--m", type=int, default=1000, help="connections that then send one request")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    if hard < args.n + 100:
        sys.exit(f"open-file limit {hard} is below {args.n} connections")

    backend = Backend(("127.0.0.1", 0), Hello)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    conf = tempfile.mkdtemp(prefix="strait-mem-")
    with open(os.path.join(conf, "config.yaml"), "w") as f:
        f.write(
            "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: %d\n"
            "deployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: yaml\n" % port
        )
    with open(os.path.join(conf, "apisix.yaml"), "w") as f:
        f.write(
            'routes:\n  - uri: "/*"\n    upstream:\n      nodes:\n        "127.0.0.1:%d": 1\n#END\n'
            % backend.server_address[1]
        )
    proc = subprocess.Popen(
        [args.strait, "run", "-c", os.path.join(conf, "config.yaml"), "--workers", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    conns = []
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    sys.exit("strait did not start")
                time.sleep(0.05)
        base = settle(proc.pid)
        for _ in range(args.n):
            conns.append(socket.create_connection(("127.0.0.1", port)))
        idle = settle(proc.pid)
        print(f"idle: {args.n} connections, RSS {base} -> {idle} KiB, "
              f"{(idle - base) * 1024 / args.n:.0f} B per connection")
        req = b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n"
        t0 = time.monotonic()
        for s in conns[: args.m]:
            s.sendall(req)
            s.settimeout(10)
            got = b""
            while not got.endswith(b"Hello, World!"):
                chunk = s.recv(4096)
                if not chunk:
                    sys.exit(f"connection {conns.index(s)} closed before the answer "
                             f"({time.monotonic() - t0:.1f} s after the first request)")
                got += chunk
        used = settle(proc.pid)
        print(f"after one request on {args.m}: RSS {idle} -> {used} KiB, "
              f"{(used - idle) * 1024 / args.m:.0f} B more per used connection")
    finally:
        for s in conns:
            s.close()
        proc.terminate()
        proc.wait(timeout=10)
        backend.shutdown()


if __name__ == "__main__":
    main()
