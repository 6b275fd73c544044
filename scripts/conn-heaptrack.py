#!/usr/bin/env python3
"""Heap bytes held per idle downstream connection, counted by heaptrack (BENCHMARKS.md, "Memory").

Resident memory (`scripts/conn-memory.py`) grows in steps of the allocator's segments, so its
per-connection figure moves by a few hundred bytes with the count. This counts the allocations
themselves: it runs a Strait built with the system allocator under heaptrack, opens N idle client
connections (plain ones that send nothing, or h2c ones that send the preface and SETTINGS),
stops Strait with SIGKILL while they are open, and prints the allocation sites that hold N (or
N + 1) blocks, with their bytes per connection. Everything is on 127.0.0.1 with ports chosen by
the kernel; the script ends only the processes it started.

    cargo build --profile quick --features system-alloc
    python3 scripts/conn-heaptrack.py [--n 2000] [--h2]
"""

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--strait", default="target/quick/strait")
    ap.add_argument("--n", type=int, default=2000, help="idle connections")
    ap.add_argument("--h2", action="store_true", help="h2c connections (preface and SETTINGS sent)")
    args = ap.parse_args()
    port = free_port()
    conf = tempfile.mkdtemp(prefix="strait-heap-")
    with open(os.path.join(conf, "config.yaml"), "w") as f:
        f.write("apisix:\n  node_listen:\n    - ip: 127.0.0.1\n      port: %d\n      enable_http2: true\n"
                "deployment:\n  role: data_plane\n  role_data_plane:\n    config_provider: yaml\n" % port)
    with open(os.path.join(conf, "apisix.yaml"), "w") as f:
        f.write('routes:\n  - uri: "/*"\n    upstream:\n      nodes:\n        "127.0.0.1:1": 1\n#END\n')
    out = os.path.join(conf, "heap")
    # heaptrack runs the program as a child of its own script, with the same command line.
    cmd = [os.path.abspath(args.strait), "run", "-c", os.path.join(conf, "config.yaml"), "--workers", "1"]
    tracer = subprocess.Popen(["heaptrack", "-o", out] + cmd, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    conns = []
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or tracer.poll() is not None:
                    sys.exit("strait did not start under heaptrack")
                time.sleep(0.1)
        for _ in range(args.n):
            s = socket.create_connection(("127.0.0.1", port))
            if args.h2:
                s.sendall(PREFACE + SETTINGS)
            conns.append(s)
        time.sleep(3)
        # The traced program: the child of heaptrack's script whose command line is ours.
        program = None
        for pid in os.listdir("/proc"):
            if not pid.isdigit():
                continue
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")[:-1]
                with open(f"/proc/{pid}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except OSError:
                continue
            if [a.decode() for a in argv] == cmd and ppid == tracer.pid:
                program = int(pid)
        if program is None:
            sys.exit("could not find the traced program")
        os.kill(program, signal.SIGKILL)
        tracer.wait(timeout=60)
    finally:
        for s in conns:
            s.close()
        if tracer.poll() is None:
            tracer.terminate()
    data = [os.path.join(conf, f) for f in os.listdir(conf) if f.startswith("heap")]
    if not data:
        sys.exit("heaptrack wrote no data")
    report = subprocess.run(["heaptrack_print", "-f", data[0], "--print-leaks", "1", "--print-peaks", "0",
                             "--print-allocators", "0", "--print-temporary", "0"],
                            capture_output=True, text=True).stdout
    total = 0.0
    units = {"": 1, "K": 1e3, "M": 1e6, "G": 1e9}
    print(f"{args.n} idle {'h2c' if args.h2 else 'plain'} connections, blocks still held at the kill:")
    # The context after each entry is looked at, not consumed: the next entry may be in it.
    for m in re.finditer(r"^(\d+(?:\.\d+)?)([KMG]?)B? leaked over (\d+) calls from:?\n(?=((?:.*\n){0,40}))",
                         report, re.M):
        calls = int(m.group(3))
        if calls not in (args.n, args.n + 1):
            continue
        size = float(m.group(1)) * units[m.group(2)]
        # Strait's own frames first (tokio's paths are relative too: src/runtime/..., src/io/...).
        frames = re.findall(r"at ((?:src|protocols/src)/[^\s]+)", m.group(4))
        ours = [f for f in frames if not re.match(r"src/(runtime|task|loom|io|net|time|sync|util)/", f)]
        # A site heaptrack also reports merged with others under a header without a colon.
        if not m.group(0).rstrip().endswith(":"):
            continue
        per = size / args.n
        total += per
        if ours:
            where = ours[0]
        elif frames:
            where = f"(tokio, {frames[0]}; Strait's frames inlined away)"
        else:
            where = "(tokio: a task's own allocation)"
        print(f"  {per:7.0f} B  {where}")
    print(f"  {total:7.0f} B per connection in all")


if __name__ == "__main__":
    main()
