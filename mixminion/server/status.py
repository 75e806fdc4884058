"""What a running node says about itself: ``WorkDir/status.json``, and
``/status`` and ``/health`` on the metrics port.

One document (:func:`status_document`), read by ``mixminiond status``
from the file and served live on the metrics port: identity, listening
addresses, packet keys, publication, queues, processing, health, the
node's last WARN/ERROR lines and, on a pinging node, its reliability as
the pinger's last directory has it.  The node writes it atomically when it has
started, every :data:`STATUS_INTERVAL` seconds, after a key rotation, a
publication attempt and a SIGHUP, and once more at a clean stop with
``"running": false`` (doc/server.md, "Health and status").

Health (:func:`health_reasons`) is ok when the MMTP port listens, a
packet key is valid now, processing runs and no disk the node writes to
is under its ``MinFreeDisk`` floor; each failing condition is one short
reason (no network addresses in any of them).
"""

from __future__ import annotations

import json
import os
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from twisted.logger import LogLevel, PredicateResult, formatEvent

import mixminion
from mixminion.fileutil import atomic_write
from mixminion.logfilter import LOG_FILTER, SeverityFilter
from mixminion.server.diskspace import Shortage, megabytes, shortage

#: seconds between two writes of ``status.json`` while the node runs
STATUS_INTERVAL = 10.0
#: how many of the node's last WARN/ERROR lines the document keeps
MAX_ERRORS = 10
#: whose log lines count as the node's own
NAMESPACE = "mixminion"
#: a log event with this key set is news, not an error (the WARN start line)
NOTICE = "mixminion_notice"


def status_path(work_dir: str) -> str:
    """Where the node writes its status document."""
    return os.path.join(work_dir, "status.json")


# --- health ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class HealthFacts:
    """What the health rules look at, gathered from the node by :func:`health_facts`."""

    #: how many MMTP ports are not listening
    not_listening: int = 0
    #: whether a packet key is valid now (Valid-After <= now <= Valid-Until)
    key_valid: bool = True
    #: why processing does not run (None: it runs)
    processing: Optional[str] = None
    #: reception's disk under ``MinFreeDisk`` (None: above it, or no floor)
    disk: Optional[Shortage] = None
    #: later stages waiting for disk space ("processing", "delivery by MBOX")
    paused: Sequence[str] = ()


def health_reasons(facts: HealthFacts) -> list[str]:
    """One short line per failing condition; none when the node is healthy."""
    reasons = []
    if facts.not_listening:
        reasons.append("not listening on the MMTP port" + ("s" if facts.not_listening > 1 else ""))
    if not facts.key_valid:
        reasons.append("no packet key is valid now")
    if facts.processing is not None:
        reasons.append(f"processing not running: {facts.processing}")
    if facts.disk is not None:
        reasons.append(f"disk space under MinFreeDisk: {megabytes(facts.disk.free)} free on the "
                       f"disk of {facts.disk.path}, floor {megabytes(facts.disk.floor)}")
    reasons.extend(f"{stage} paused for disk space" for stage in facts.paused)
    return reasons


def valid_now(keysets: Sequence[Any], now: float) -> list[Any]:
    """The keysets whose packet key is valid at ``now``, oldest first."""
    return [k for k in keysets if k.valid_after <= now <= k.valid_until]


def keysets(node: Any) -> list[Any]:
    """The packet keysets the node holds, oldest first (none without a key store)."""
    return node.keys.keysets if node.keys is not None else []


def health_facts(node: Any, now: float) -> HealthFacts:
    """The facts of a :class:`~mixminion.server.node.MixNode` at wall time ``now``."""
    processor = node.processor
    if node.keys is not None:
        key_valid = bool(valid_now(keysets(node), now))
    else:  # a node built without a key store (tests): its live keys
        key_valid = bool(node.packet_keys())
    paused = ["processing"] if processor.disk.paused else []
    paused += [f"delivery by {name}" for name in node.delivery.paused_modules]
    return HealthFacts(
        not_listening=sum(1 for svc in node.mmtp_listeners if svc.port is None),
        key_valid=key_valid,
        processing=None if processing_runs(node) else processor.failing or "stopped",
        disk=shortage([node.sink.free_space], node.sink.min_free_bytes),
        paused=tuple(paused),
    )


# --- the node's last errors --------------------------------------------------------------------


class RecentErrors:
    """A log observer keeping the node's own last WARN and ERROR lines
    (namespace ``mixminion.*``, as far as ``LogLevel`` lets them into the
    log; not the :data:`NOTICE` ones), as formatted text without tracebacks."""

    def __init__(self, limit: int = MAX_ERRORS, log_filter: SeverityFilter = LOG_FILTER) -> None:
        self.entries: deque[dict[str, Any]] = deque(maxlen=limit)
        self.log_filter = log_filter

    def __call__(self, event: dict) -> None:
        level = event.get("log_level")
        namespace = event.get("log_namespace") or ""
        if level is None or level < LogLevel.warn or event.get(NOTICE):
            return
        if namespace != NAMESPACE and not namespace.startswith(NAMESPACE + "."):
            return
        if self.log_filter(event) is PredicateResult.no:
            return
        try:
            message = formatEvent(event).strip()
        except Exception:  # noqa: BLE001 - an observer must never raise
            return
        if not message:
            return
        self.entries.append({"time": float(event.get("log_time") or 0.0),
                             "level": "warn" if level == LogLevel.warn else "error",
                             "message": message})

    def items(self) -> list[dict[str, Any]]:
        """Oldest first."""
        return list(self.entries)


# --- the document ------------------------------------------------------------------------------


def publication(node: Any) -> dict[str, Any]:
    """The ``publication`` part: the authorities, the publisher's last
    attempt, success and error; a success in an earlier run counts (the
    newest ``published`` date of the keysets)."""
    publisher = node.publisher
    published = [k.published_at for k in keysets(node) if k.published_at is not None]
    last_success = publisher.last_success if publisher is not None else None
    if published:
        last_success = max(float(max(published)), last_success or 0.0)
    return {
        "authorities": [url for url, _fingerprint in publisher.authorities] if publisher else [],
        "last_attempt": publisher.last_attempt if publisher is not None else None,
        "last_success": last_success,
        "last_error": publisher.last_error if publisher is not None else None,
    }


def status_document(node: Any, now: float, running: bool = True) -> dict[str, Any]:
    """The status of ``node`` (a :class:`~mixminion.server.node.MixNode`)
    at wall time ``now``: the JSON object of the contract."""
    processor = node.processor
    reasons = health_reasons(health_facts(node, now))
    sizes = node.queue_sizes()
    return {
        "version": mixminion.__version__,
        "running": running,
        "pid": os.getpid(),
        "nickname": node.config.server.nickname,
        "fingerprint": node.identity.public.fingerprint,
        "started": node.started,
        "updated": now,
        "listening": node.listening(),
        "keys": [{"valid_after": float(k.valid_after), "valid_until": float(k.valid_until)}
                 for k in keysets(node)],
        "next_rotation": float(node.keys.next_event(now)) if node.keys is not None else None,
        "publication": publication(node),
        "queues": {"incoming": sizes["incoming"], "pool": sizes["pool"],
                   "outgoing": sizes["outgoing"], "deliver": node.deliver_sizes()},
        "processing": {"running": processing_runs(node), "failing": processor.failing,
                       "paused_for_disk": processor.disk.paused},
        "health": {"ok": not reasons, "reasons": reasons},
        "last_errors": node.recent_errors.items(),
        "pinging": pinging(node),
    }


def pinging(node: Any) -> Optional[dict[str, Any]]:
    """The ``pinging`` part: what the pinger's last directory says of this
    node and how its reports fare (None when the node does not ping)."""
    pinger = getattr(node, "pinger", None)
    return pinger.status() if pinger is not None else None


def processing_runs(node: Any) -> bool:
    return node.pipeline_running and node.processor.failing is None


def status_json(document: dict[str, Any]) -> bytes:
    return (json.dumps(document, indent=2, sort_keys=True) + "\n").encode("utf-8")


def write_status(path: str, document: dict[str, Any]) -> None:
    """Replace ``path`` whole (temp file, fsync, rename; mode 0600)."""
    atomic_write(path, status_json(document), 0o600)
