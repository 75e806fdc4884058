"""End-to-end speed of a whole network on this machine; prints one JSON object.

Brings up its own ``mixminion-testnet`` (3 authorities, 5 mix nodes,
Timed mixing every 1 s -- the testnet's setting, checked in the nodes'
configurations -- and the testnet's SMTP sink) in a temporary folder, sends
``--messages`` (default 200) messages with the real ``mixminion-client send
-H 4 -t ADDRESS`` (4 hops), ``--workers`` sends at a time (each worker a
copy of the client folder, so the client lock does not serialise them), and
brings the network down again.

* ``p50_latency_s`` / ``p99_latency_s``: from the start of the message's
  ``mixminion-client send`` process to the modification time of the file
  the SMTP sink wrote for it (found by a token in the body).
* ``messages_per_min``: messages delivered per minute, from the first send
  starting to the last arrival (so it is bounded by how fast the client
  processes can build and hand over messages, too).
* ``send_cpu_ms``: client CPU (user + system) per 4-hop message, measured
  with ``resource.getrusage(RUSAGE_CHILDREN)`` around all the ``send``
  subprocesses; it includes starting Python and importing the client.
  ``client_startup_cpu_ms`` is the same for ``mixminion-client --version``,
  the part that is only interpreter start-up and imports.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

PASSPHRASE = "testnet"
RECIPIENT = "alice@example.com"


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def testnet(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "mixminion.testnet", *args], capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0:
        raise SystemExit(f"mixminion-testnet {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=200)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--timeout", type=float, default=180, help="seconds to wait for arrivals")
    args = ap.parse_args()

    top = tempfile.mkdtemp(prefix="mixminion-e2e-")
    net_dir = os.path.join(top, "net")
    try:
        t_up = time.monotonic()
        testnet("up", "--nodes", "5", net_dir)
        up_s = time.monotonic() - t_up
        with open(os.path.join(net_dir, "testnet.json"), encoding="utf-8") as f:
            state = json.load(f)
        intervals = set()
        for proc in state["procs"]:
            if proc["kind"] == "node":
                with open(proc["conf"], encoding="utf-8") as f:
                    conf = f.read()
                algo = re.search(r"^MixAlgorithm:\s*(\S+)", conf, re.M)
                interval = re.search(r"^MixInterval:\s*(.+)$", conf, re.M)
                intervals.add((algo.group(1) if algo else None,
                               interval.group(1).strip() if interval else None))
        client_dir = os.path.join(net_dir, "client")
        with open(os.path.join(client_dir, "mixminionrc"), encoding="utf-8") as f:
            rc_text = f.read()
        rcs = []
        for w in range(args.workers):
            wdir = os.path.join(top, f"client{w}")
            shutil.copytree(client_dir, wdir, ignore=shutil.ignore_patterns("lock", "mixminionrc"))
            rc = os.path.join(wdir, "mixminionrc")
            with open(rc, "w", encoding="utf-8") as f:
                f.write(rc_text.replace(f"UserDir: {client_dir}", f"UserDir: {wdir}"))
            rcs.append(rc)
        client = [sys.executable, "-m", "mixminion.client.cli"]

        cpu0 = children_cpu()
        for _ in range(5):
            subprocess.run(client + ["--version"], capture_output=True, check=True)
        startup_cpu_ms = (children_cpu() - cpu0) / 5 * 1000

        run_id = os.urandom(4).hex()
        bodies = os.path.join(top, "bodies")
        os.makedirs(bodies)
        started: dict[str, float] = {}
        failures: list[str] = []
        lock = threading.Lock()

        def send(i: int) -> None:
            token = f"e2e-{run_id}-{i:04d}"
            path = os.path.join(bodies, f"{i}.txt")
            with open(path, "w", encoding="ascii") as f:
                f.write(f"Benchmark message {token}\n")
            env = dict(os.environ, MIXMINIONRC=rcs[i % len(rcs)], MIXMINION_PASSPHRASE=PASSPHRASE)
            t = time.time()
            done = subprocess.run(client + ["send", "--no-queue", "-D", "no", "-H", "4", "-t", RECIPIENT,
                                            "-i", path], env=env, capture_output=True, text=True)
            with lock:
                started[token] = t
                if done.returncode != 0:
                    failures.append(f"{token}: exit {done.returncode}: {done.stderr.strip()}")

        cpu0 = children_cpu()
        t0 = time.time()
        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(send, range(args.messages)))
        send_wall_s = time.time() - t0
        send_cpu_ms = (children_cpu() - cpu0) / args.messages * 1000

        mail_dir = os.path.join(net_dir, "mail")
        arrived: dict[str, float] = {}
        seen: set[str] = set()
        pattern = re.compile(rf"e2e-{run_id}-\d{{4}}")
        deadline = time.time() + args.timeout
        want = len(started) - len(failures)
        while len(arrived) < want and time.time() < deadline:
            for name in os.listdir(mail_dir):
                if name in seen or not name.endswith(".eml"):
                    continue
                path = os.path.join(mail_dir, name)
                with open(path, encoding="utf-8", errors="replace") as f:
                    m = pattern.search(f.read())
                seen.add(name)
                if m:
                    arrived[m.group(0)] = os.stat(path).st_mtime
            time.sleep(0.2)
        latencies = [arrived[t] - started[t] for t in arrived]
        result = {
            "messages": args.messages,
            "delivered": len(arrived),
            "send_failures": len(failures),
            "hops": 4,
            "nodes": 5,
            "mixing": sorted(f"{a} {i}" for a, i in intervals),
            "workers": args.workers,
            "messages_per_min": round(len(arrived) / (max(arrived.values()) - t0) * 60, 1)
            if arrived else 0.0,
            "p50_latency_s": round(percentile(latencies, 0.5), 2) if latencies else None,
            "p99_latency_s": round(percentile(latencies, 0.99), 2) if latencies else None,
            "max_latency_s": round(max(latencies), 2) if latencies else None,
            "send_cpu_ms": round(send_cpu_ms, 1),
            "send_cpu_method": "getrusage(RUSAGE_CHILDREN) user+sys around the "
                               "'mixminion-client send -H 4' subprocesses, per message",
            "client_startup_cpu_ms": round(startup_cpu_ms, 1),
            "send_phase_wall_s": round(send_wall_s, 1),
            "testnet_up_s": round(up_s, 1),
        }
        if failures:
            result["first_failures"] = failures[:3]
        print(json.dumps(result))
    finally:
        if os.path.exists(os.path.join(net_dir, "testnet.json")):
            subprocess.run([sys.executable, "-m", "mixminion.testnet", "down", net_dir],
                           capture_output=True, timeout=120)
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
