"""What one ``mixminion-client send`` costs, printed as one JSON object.

A live first hop (``_mmtp_server.py``: our MMTP responder with a durable
sink) runs in a child process; a signed directory of four servers, the
first of them that responder, sits in a fresh ``UserDir``.  Each run starts
the real console script as a new process and sends a 1 KiB message through
the four hops (``-D no``: no download), and its CPU time (user + system,
from ``wait4``, process start included) is recorded, after one warm-up
send that leaves the bytecode caches an installed client has (the
children run without ``PYTHONDONTWRITEBYTECODE``).  In the same run:
the CPU of starting Python alone and of importing the client, so the
figures can be compared across noisy machines.

Figures (medians of ``--runs`` runs): ``send_cpu_s``, ``import_cpu_s``
(importing ``mixminion.client.cli`` minus starting Python),
``python_start_cpu_s``, and ``send_over_start`` (their ratio).

Usage: python3 benchmarks/client.py [--runs 10]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from mixminion.codec.rsa import PrivateKey
from mixminion.codec.textformat import previous_midnight
from mixminion.directory.descriptor import (
    DeliveryInfo,
    DescriptorFields,
    IncomingMMTP,
    OutgoingMMTP,
    build_descriptor,
    parse_descriptor,
)
from mixminion.directory.directory import DirectoryInfo, VotingServer, build_directory, sign_directory

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mmtp import start_server  # noqa: E402

DAY = 86400
NICKNAMES = ("Alpha", "Beta", "Gamma", "Delta")


def _descriptor(nickname: str, identity: PrivateKey, port: int, today: int) -> object:
    fields = DescriptorFields(
        nickname=nickname, contact=f"{nickname.lower()}@example.org",
        packet_key=PrivateKey.generate(2048).public, published=today - DAY + 60,
        valid_after=today - DAY, valid_until=today + 30 * DAY,
        incoming=IncomingMMTP(hostname="127.0.0.1", port=port), outgoing=OutgoingMMTP(),
        smtp=DeliveryInfo(max_size_kib=100), max_fragments=16)
    return parse_descriptor(build_descriptor(fields, identity, os.urandom), fields.published,
                            check_validity=False)


def prepare(base: str, first_hop_identity: PrivateKey, port: int) -> dict[str, str]:
    """A UserDir with a signed directory and a configuration; the environment."""
    today = previous_midnight(int(time.time()))
    authority = PrivateKey.generate(2048)
    descriptors = [_descriptor("Alpha", first_hop_identity, port, today)]
    descriptors += [_descriptor(n, PrivateKey.generate(2048), 9, today) for n in NICKNAMES[1:]]
    info = DirectoryInfo(
        status="consensus", valid_after=today, valid_until=today + DAY,
        recommended_nicknames=NICKNAMES,
        voting_servers=(VotingServer(authority.public.fingerprint, "http://127.0.0.1:9/"),))
    text = sign_directory(build_directory(info, descriptors), authority, os.urandom)
    user_dir = os.path.join(base, "user")
    os.makedirs(user_dir, mode=0o700)
    with open(os.path.join(user_dir, "dir"), "w") as f:
        f.write(text)
    rc = os.path.join(base, "mixminionrc")
    with open(rc, "w") as f:
        f.write(f"[User]\nUserDir: {user_dir}\n[DirectoryServers]\n"
                f"Authority: http://127.0.0.1:9/ {authority.public.fingerprint}\n"
                "[Network]\nTimeout: 30 seconds\n")
    with open(os.path.join(base, "message"), "wb") as f:
        f.write(os.urandom(768).hex()[:1024].encode())
    env = {**os.environ, "MIXMINIONRC": rc, "HOME": base}
    # Measure what a user's installed client costs: with its bytecode
    # cached (pip compiles it at install), not compiled on every start.
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def client_command() -> list[str]:
    """The console script as installed next to this interpreter, else the
    same entry point through ``-c``."""
    script = os.path.join(os.path.dirname(sys.executable), "mixminion-client")
    if os.path.exists(script):
        return [sys.executable, script]
    return [sys.executable, "-c", "from mixminion.client.launch import main; main()"]


def cpu_of(argv: list[str], env: dict[str, str]) -> float:
    """User + system CPU seconds of one child process run to completion."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode() if proc.stderr else ""
    if proc.returncode:
        raise RuntimeError(f"{argv[-1]} failed ({proc.returncode}): {err.strip()}")
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="mixminion-bench-client-")
    try:
        hop = os.path.join(base, "hop")
        os.makedirs(hop)
        identity = PrivateKey.generate(2048)
        with open(os.path.join(hop, "identity.der"), "wb") as f:
            f.write(identity.der)
        server, port, keyid = start_server("mmtp", hop)
        assert keyid == identity.public.keyid
        try:
            env = prepare(base, identity, port)
            send = client_command() + ["send", "-t", "bob@example.org", "-P", ",".join(NICKNAMES),
                                       "-D", "no", "-i", os.path.join(base, "message")]
            cpu_of(send, env)  # warm-up: writes the bytecode caches, not counted
            start, imports, sends = [], [], []
            for _ in range(args.runs):  # interleaved, so drift hits all three alike
                start.append(cpu_of([sys.executable, "-c", "pass"], env))
                imports.append(cpu_of([sys.executable, "-c", "import mixminion.client.cli"], env))
                sends.append(cpu_of(send, env))
        finally:
            server.stdin.close()
            stored = int(server.stdout.readline() or 0)
            server.wait()
        if stored != args.runs + 1:
            raise RuntimeError(f"the first hop stored {stored} packets, not {args.runs + 1}")
        python_start = statistics.median(start)
        send_cpu = statistics.median(sends)
        print(json.dumps({
            "runs": args.runs,
            "send_cpu_s": round(send_cpu, 4),
            "import_cpu_s": round(statistics.median(imports) - python_start, 4),
            "python_start_cpu_s": round(python_start, 4),
            "send_over_start": round(send_cpu / python_start, 2),
            "send_cpu_s_all": [round(x, 4) for x in sends],
            "packets_stored_by_first_hop": stored,
        }))
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
