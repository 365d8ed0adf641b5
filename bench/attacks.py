#!/usr/bin/env python3
"""The hardening issue's attack loads, replayed against a virtual cluster's node proxies.

Run as root from the repository, with the L7 test bed up:

    cargo xtask cluster up examples/l7/workloads.yaml
    python3 bench/attacks.py            # prints one JSON object per load
    cargo xtask cluster down

Each load runs from the meshed pod `l7/client` (node-1) with Python sockets, while this script
samples the resident memory (VmRSS) of both node proxies every 200 ms and checks that node-1
still answers a normal request through the mesh. Loads, as the issue measured them on the
proxy before its limits:

- slowloris: 500 connections sending a request head at one byte a second;
- heads: 1,300 connections each sending 400 kB of an unfinished request head;
- bulk-then-idle: 600 connections across nodes that each move 900 kB, then stay idle;
- large-resource: a VirtualService of 100,000 routes (7.8 MB) applied.

Nothing here asserts: it reports what happened (answers, connections cut, RSS) for
bench/RESULTS.md.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(ROOT, "target/xtask/manifest-venv/bin/python3")
CLUSTER = ["cargo", "xtask", "cluster"]


def cluster(*args, check=True):
    return subprocess.run(
        CLUSTER + list(args), cwd=ROOT, capture_output=True, text=True, check=check
    ).stdout


def proxy_pids():
    status = cluster("status")
    return {
        node: int(pid)
        for node, pid in re.findall(r"^(node-\d+)\s.*?pid (\d+)", status, re.M)
    }


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


class Sampler:
    """Peak RSS of each proxy and whether node-1 kept serving, while a load runs."""

    def __init__(self):
        self.pids = proxy_pids()
        self.start = {n: rss_mib(p) for n, p in self.pids.items()}
        self.peak = dict(self.start)
        self.served = self.failed = 0
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self.sample, daemon=True),
            threading.Thread(target=self.probe, daemon=True),
        ]
        for t in self.threads:
            t.start()

    def sample(self):
        while not self.stop.is_set():
            for node, pid in self.pids.items():
                self.peak[node] = max(self.peak[node], rss_mib(pid))
            time.sleep(0.2)

    def probe(self):
        while not self.stop.is_set():
            out = subprocess.run(
                CLUSTER + ["exec", "l7/client", "--", "curl", "-s", "-o", "/dev/null",
                           "-w", "%{http_code}", "--max-time", "2", "http://echo-v2/get"],
                cwd=ROOT, capture_output=True, text=True,
            ).stdout.strip()
            if out == "200":
                self.served += 1
            else:
                self.failed += 1
            time.sleep(1)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join()
        end = {n: rss_mib(p) for n, p in self.pids.items()}
        return {
            "rss_mib_before": {n: round(v, 1) for n, v in self.start.items()},
            "rss_mib_peak": {n: round(v, 1) for n, v in self.peak.items()},
            "rss_mib_after": {n: round(v, 1) for n, v in end.items()},
            "normal_requests_served": self.served,
            "normal_requests_failed": self.failed,
        }


def in_pod(script):
    out = subprocess.run(
        CLUSTER + ["exec", "l7/client", "--", PYTHON, "-c", script],
        cwd=ROOT, capture_output=True, text=True,
    )
    if out.returncode != 0:
        raise SystemExit(f"the load failed: {out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


SLOWLORIS = r"""
import json, socket, time
conns = []
for _ in range(500):
    s = socket.create_connection(("echo", 80), timeout=5)
    s.sendall(b"GET /get HTTP/1.1\r\nHost: echo\r\nX-Slow: ")
    conns.append(s)
open_ = conns
start = time.monotonic()
while time.monotonic() - start < 40 and open_:
    still = []
    for s in open_:
        try:
            s.sendall(b"a")
            still.append(s)
        except OSError:
            pass
    open_ = still
    time.sleep(1)
print(json.dumps({"connections": 500, "open_after_40s": len(open_)}))
"""

HEADS = r"""
import json, socket, threading
answers = {"431": 0, "closed": 0, "other": 0}
lock = threading.Lock()
def one():
    try:
        s = socket.create_connection(("echo", 80), timeout=20)
        s.sendall(b"GET /get HTTP/1.1\r\nHost: echo\r\n")
        chunk = b"X-Pad-" + b"a" * 1000 + b"\r\n"
        sent = 0
        while sent < 400_000:
            s.sendall(chunk)
            sent += len(chunk)
        data = s.recv(64)
    except OSError:
        data = b""
    with lock:
        if b" 431 " in data:
            answers["431"] += 1
        elif not data:
            answers["closed"] += 1
        else:
            answers["other"] += 1
threads = [threading.Thread(target=one) for _ in range(1300)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps({"connections": 1300, "answers": answers}))
"""

BULK_THEN_IDLE = r"""
import json, socket, time
body = b"b" * 900_000
conns = []
for _ in range(600):
    s = socket.create_connection(("echo-v2", 7070), timeout=20)
    s.sendall(b"POST /anything HTTP/1.1\r\nHost: echo-v2\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    got = b""
    while b"\r\n\r\n" not in got:
        got += s.recv(65536)
    head, rest = got.split(b"\r\n\r\n", 1)
    length = int([l.split(b":")[1] for l in head.split(b"\r\n") if l.lower().startswith(b"content-length")][0])
    while len(rest) < length:
        rest += s.recv(65536)
    conns.append(s)
time.sleep(15)
print(json.dumps({"connections": len(conns), "moved_each_kb": 900, "held_idle_s": 15}))
"""


def large_resource():
    lines = [
        "apiVersion: networking.istio.io/v1",
        "kind: VirtualService",
        "metadata: {name: huge, namespace: l7}",
        "spec:",
        "  hosts: [huge.example.test]",
        "  http:",
    ]
    for i in range(100_000):
        lines.append(f"  - match: [{{uri: {{exact: /p{i}}}}}]")
        lines.append("    route: [{destination: {host: echo}}]")
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        f.write("\n".join(lines) + "\n")
        path = f.name
    start = time.monotonic()
    cluster("apply", path)
    took = time.monotonic() - start
    log = open("/run/weft-cluster/logs/node-node-1.log").read()
    rejected = "bytes Kubernetes stores in one object" in log
    cluster("delete", path, check=False)
    os.unlink(path)
    return {"routes": 100_000, "bytes": sum(len(l) + 1 for l in lines),
            "apply_s": round(took, 1), "rejected_naming_the_limit": rejected}


def main():
    loads = [
        ("slowloris", lambda: in_pod(SLOWLORIS)),
        ("heads", lambda: in_pod(HEADS)),
        ("bulk-then-idle", lambda: in_pod(BULK_THEN_IDLE)),
        ("large-resource", large_resource),
    ]
    only = sys.argv[1:]
    for name, run in loads:
        if only and name not in only:
            continue
        sampler = Sampler()
        result = run()
        report = sampler.finish()
        print(json.dumps({"load": name, **result, **report}), flush=True)
        time.sleep(12)  # the proxies trim their heap every 10 s


if __name__ == "__main__":
    main()
