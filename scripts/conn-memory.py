#!/usr/bin/env python3
"""Resident memory per downstream connection of a running Strait (BENCHMARKS.md, "Memory").

Starts `strait run` on a generated config (one route to a small keep-alive HTTP backend run by
this script), opens N client connections that send nothing, and reports the RSS growth per
connection; then sends one request on M of them (keep-alive) and reports the growth per used
connection. `--l4 K` then also opens K sessions through an L4 stream route to an echo server,
each sending one line and reading it back, and reports the RSS per idle session; `--l4tls K`
does the same through a listener that terminates TLS. Everything is
on 127.0.0.1 with ports chosen by the kernel; the script ends only the processes it started.

    cargo build --release && python3 scripts/conn-memory.py [--n 10000] [--m 1000] [--h2 K] [--tls K] [--l4 K] [--l4tls K]
"""

import argparse
import http.server
import os
import resource
import selectors
import socket
import ssl
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


PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


def frame(kind, flags, stream, payload=b""):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def read_until_end_stream(s, stream):
    """Reads frames until one on `stream` carries END_STREAM; acks the server's SETTINGS."""
    buf = b""
    while True:
        while len(buf) >= 9:
            n = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + n:
                break
            kind, flags, sid = buf[3], buf[4], int.from_bytes(buf[5:9], "big") & 0x7FFFFFFF
            buf = buf[9 + n:]
            if kind == 4 and not flags & 1:
                s.sendall(frame(4, 1, 0))
            if sid == stream and kind in (0, 1) and flags & 1:
                return
        chunk = s.recv(65536)
        if not chunk:
            sys.exit("h2c connection closed before the answer")
        buf += chunk


def h2_idle_and_used(pid, port, n, base, keep):
    """RSS per idle h2c connection, then after one GET on each (HPACK static table only)."""
    h2 = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(PREFACE + frame(4, 0, 0))
        h2.append(s)
    keep.extend(h2)
    idle = settle(pid)
    print(f"h2c idle: {n} connections, RSS {base} -> {idle} KiB, "
          f"{(idle - base) * 1024 / n:.0f} B per connection")
    # :method GET, :scheme http, :path /, :authority x (literal, indexed name 1)
    headers = bytes([0x82, 0x86, 0x84, 0x41, 0x01]) + b"x"
    for s in h2:
        s.settimeout(10)
        s.sendall(frame(1, 0x5, 1, headers))
        read_until_end_stream(s, 1)
    used = settle(pid)
    print(f"h2c after one request on each: RSS {idle} -> {used} KiB, "
          f"{(used - idle) * 1024 / n:.0f} B more per connection")


def tls_idle_and_used(pid, port, n, base, keep):
    """RSS per idle HTTP/1.1-over-TLS connection (handshake done), then after one GET on each."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(["http/1.1"])
    conns = []
    for _ in range(n):
        conns.append(ctx.wrap_socket(socket.create_connection(("127.0.0.1", port)), server_hostname="localhost"))
    keep.extend(conns)
    idle = settle(pid)
    print(f"TLS idle: {n} connections, RSS {base} -> {idle} KiB, "
          f"{(idle - base) * 1024 / n:.0f} B per connection")
    for s in conns:
        s.settimeout(10)
        s.sendall(b"GET /hello HTTP/1.1\r\nhost: x\r\n\r\n")
        got = b""
        while not got.endswith(b"Hello, World!"):
            chunk = s.recv(4096)
            if not chunk:
                sys.exit("TLS connection closed before the answer")
            got += chunk
    used = settle(pid)
    print(f"TLS after one request on each: RSS {idle} -> {used} KiB, "
          f"{(used - idle) * 1024 / n:.0f} B more per connection")


class Echo:
    """A single-threaded TCP echo server (selectors), for any number of idle L4 sessions."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.lsock = socket.create_server(("127.0.0.1", 0), backlog=1024)
        self.lsock.setblocking(False)
        self.sel.register(self.lsock, selectors.EVENT_READ)
        self.port = self.lsock.getsockname()[1]
        self.conns = []
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while True:
            for key, _ in self.sel.select():
                if key.fileobj is self.lsock:
                    c, _ = self.lsock.accept()
                    c.setblocking(False)
                    self.conns.append(c)
                    self.sel.register(c, selectors.EVENT_READ)
                    continue
                try:
                    data = key.fileobj.recv(4096)
                except OSError:
                    data = b""
                if data:
                    key.fileobj.sendall(data)
                else:
                    self.sel.unregister(key.fileobj)
                    key.fileobj.close()


def l4_idle(pid, port, n, base, keep, tls=None):
    """RSS per idle L4 session (client and node connections), after one echoed line on each;
    with `tls` (a client context), the gateway terminates TLS."""
    conns = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if tls:
            s = tls.wrap_socket(s, server_hostname="localhost")
        s.settimeout(10)
        s.sendall(b"ping\n")
        got = b""
        while got != b"ping\n":
            chunk = s.recv(16)
            if not chunk:
                sys.exit("L4 session closed before the echo")
            got += chunk
        conns.append(s)
    keep.extend(conns)
    idle = settle(pid)
    print(f"L4{' TLS' if tls else ''} idle: {n} sessions, RSS {base} -> {idle} KiB, "
          f"{(idle - base) * 1024 / n:.0f} B per session")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strait", default="target/release/strait")
    ap.add_argument("--n", type=int, default=10000, help="idle connections")
    ap.add_argument("--m", type=int, default=1000, help="connections that then send one request")
    ap.add_argument("--h2", type=int, default=0,
                    help="then also this many h2c connections (preface and SETTINGS, idle; then one GET each)")
    ap.add_argument("--tls", type=int, default=0,
                    help="then also this many HTTP/1.1 connections over TLS (idle after the handshake; then one GET each)")
    ap.add_argument("--l4", type=int, default=0,
                    help="then also this many L4 sessions to an echo server (one line echoed, then idle)")
    ap.add_argument("--l4tls", type=int, default=0,
                    help="then also this many L4 sessions whose TLS the gateway terminates (as --l4)")
    args = ap.parse_args()

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    need = args.n + args.h2 + args.tls + 2 * (args.l4 + args.l4tls) + 100
    if hard < need:
        sys.exit(f"open-file limit {hard} is below the {need} descriptors these connections need")

    backend = Backend(("127.0.0.1", 0), Hello)
    threading.Thread(target=backend.serve_forever, daemon=True).start()
    port = free_port()
    conf = tempfile.mkdtemp(prefix="strait-mem-")
    tls_port = free_port()
    l4_port, l4tls_port = free_port(), free_port()
    ssl_conf, ssls, stream_conf, stream_routes = "", "", "", ""
    if args.l4 or args.l4tls:
        echo = Echo()
        stream_conf = "  stream_proxy:\n    tcp:\n      - \"127.0.0.1:%d\"\n" % l4_port
        ports = [l4_port]
        if args.l4tls:
            stream_conf += "      - addr: \"127.0.0.1:%d\"\n        tls: true\n" % l4tls_port
            ports.append(l4tls_port)
        stream_routes = "stream_routes:\n"
        for i, p in enumerate(ports):
            stream_routes += ('  - id: l4-%d\n    server_port: %d\n    upstream:\n      nodes:\n'
                              '        "127.0.0.1:%d": 1\n' % (i, p, echo.port))
    if args.tls or args.l4tls:
        key, cert = os.path.join(conf, "key.pem"), os.path.join(conf, "cert.pem")
        subprocess.run(
            ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-days", "1", "-keyout", key, "-out", cert, "-subj", "/CN=localhost"],
            check=True, capture_output=True,
        )
        ssl_conf = ("  ssl:\n    enable: true\n    fallback_sni: localhost\n"
                    "    listen:\n      - ip: 127.0.0.1\n        port: %d\n" % tls_port) if args.tls else ""
        indent = lambda path: "".join("      " + line for line in open(path))
        ssls = "ssls:\n  - snis: [localhost]\n    cert: |\n%s    key: |\n%s" % (indent(cert), indent(key))
    with open(os.path.join(conf, "config.yaml"), "w") as f:
        f.write(
            "apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: %d\n%s%s"
            "deployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: yaml\n"
            % (port, ssl_conf, stream_conf)
        )
    with open(os.path.join(conf, "apisix.yaml"), "w") as f:
        f.write(
            '%s%sroutes:\n  - uri: "/*"\n    upstream:\n      nodes:\n        "127.0.0.1:%d": 1\n#END\n'
            % (ssls, stream_routes, backend.server_address[1])
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
        if args.h2:
            h2_idle_and_used(proc.pid, port, args.h2, used, conns)
            used = settle(proc.pid)
        if args.tls:
            tls_idle_and_used(proc.pid, tls_port, args.tls, used, conns)
            used = settle(proc.pid)
        if args.l4:
            l4_idle(proc.pid, l4_port, args.l4, used, conns)
            used = settle(proc.pid)
        if args.l4tls:
            ctx = ssl.create_default_context()
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            l4_idle(proc.pid, l4tls_port, args.l4tls, used, conns, tls=ctx)
    finally:
        for s in conns:
            s.close()
        proc.terminate()
        proc.wait(timeout=10)
        backend.shutdown()


if __name__ == "__main__":
    main()
