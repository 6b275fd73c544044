#!/usr/bin/env python3
"""Writes a large configuration for scale checks (BENCHMARKS.md, "Configuration size").

N routes `/svc<i>/*`, each with a host (one of 50) and two methods, each pointing at its own
named `roundrobin` upstream of one node, in APISIX's standalone format, plus a `config.yaml`
that listens on a port the kernel picks:

    python3 scripts/big-config.py --n 10000 --dir /tmp/big
    target/release/strait validate -c /tmp/big/config.yaml
    target/release/strait run -c /tmp/big/config.yaml --workers 1

Editing `apisix.yaml` then triggers a reload; its log line carries `took_ms`.
"""

import argparse
import os


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10000, help="routes, and as many upstreams")
    ap.add_argument("--dir", required=True, help="directory to write config.yaml and apisix.yaml into")
    a = ap.parse_args()
    os.makedirs(a.dir, exist_ok=True)
    with open(os.path.join(a.dir, "config.yaml"), "w") as f:
        f.write("apisix:\n  node_listen:\n    - 127.0.0.1:0\n")
    with open(os.path.join(a.dir, "apisix.yaml"), "w") as f:
        f.write("upstreams:\n")
        for i in range(a.n):
            f.write(f'  - id: u{i}\n    type: roundrobin\n    nodes:\n      "10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:80": 1\n')
        f.write("routes:\n")
        for i in range(a.n):
            f.write(
                f"  - id: r{i}\n    uri: /svc{i}/*\n    hosts: [\"h{i % 50}.example.com\"]\n"
                f"    methods: [GET, POST]\n    upstream_id: u{i}\n"
            )
        f.write("#END\n")


if __name__ == "__main__":
    main()
