"""What ``mixminiond status`` and ``mixminiond keys`` print: pure functions
of what was read (the status document, the keysets) and of ``now``.

Times are UTC, ``YYYY-MM-DD HH:MM:SS UTC``; durations are rounded to the
two largest units (``3 d 4 h``, ``5 min 12 s``).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

from mixminion.codec.textformat import format_time
from mixminion.server.control import (
    EXIT_FAILED,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    STALE_AFTER,
    NodeProcess,
)
from mixminion.server.keys import Keyset

_UNITS = (("d", 86400), ("h", 3600), ("min", 60), ("s", 1))


def when(t: Any) -> str:
    """A wall-clock time, or ``unknown``."""
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "unknown"
    return f"{format_time(int(t))} UTC"


def duration(seconds: float) -> str:
    """``seconds`` in its two largest units: ``3 d 4 h``, ``12 s``."""
    left = max(0, int(round(seconds)))
    parts = []
    for name, size in _UNITS:
        if left >= size or (name == "s" and not parts):
            parts.append(f"{left // size} {name}")
            left %= size
        elif parts:
            break
        if len(parts) == 2:
            break
    return " ".join(parts)


def relative(t: Any, now: float) -> str:
    """A time and how far it is from ``now``: ``… (in 3 h)``, ``… (5 min ago)``."""
    if not isinstance(t, (int, float)) or isinstance(t, bool):
        return "unknown"
    span = duration(abs(t - now))
    return f"{when(t)} ({'in ' + span if t > now else span + ' ago'})"


def _get(doc: Any, *path: str) -> Any:
    for name in path:
        doc = doc.get(name) if isinstance(doc, dict) else None
    return doc


# --- status ---------------------------------------------------------------------------------


def key_state(valid_after: float, valid_until: float, now: float,
              overlap: Optional[float] = None) -> str:
    """``future``, ``live``, ``overlap`` (past Valid-Until, the key still
    decrypts) or ``expired``; without ``overlap`` every key past
    Valid-Until is ``overlap`` (a running node still holds it)."""
    if valid_after > now:
        return "future"
    if now <= valid_until:
        return "live"
    if overlap is None or now <= valid_until + overlap:
        return "overlap"
    return "expired"


def _keys_fact(keys: Any, now: float) -> str:
    if not isinstance(keys, list) or not keys:
        return "none"
    return "; ".join(
        f"{when(_get(k, 'valid_after'))} to {when(_get(k, 'valid_until'))} "
        f"({key_state(_get(k, 'valid_after') or 0, _get(k, 'valid_until') or 0, now)})"
        for k in keys)


def _publication_fact(publication: Any) -> str:
    authorities = _get(publication, "authorities") or []
    if not authorities:
        return "off (no authority to publish to)"
    text = (f"to {', '.join(map(str, authorities))}; last success "
            f"{when(_get(publication, 'last_success'))}; last attempt "
            f"{when(_get(publication, 'last_attempt'))}")
    error = _get(publication, "last_error")
    return f"{text}; last error: {error}" if error else text


def _queues_fact(queues: Any) -> str:
    if not isinstance(queues, dict):
        return "unknown"
    parts = [f"{name} {queues.get(name)}" for name in ("incoming", "pool", "outgoing")]
    deliver = queues.get("deliver")
    if isinstance(deliver, dict) and deliver:
        parts += [f"deliver/{module} {count}" for module, count in sorted(deliver.items())]
    return ", ".join(parts)


def _processing_fact(processing: Any) -> str:
    if _get(processing, "failing"):
        return f"failing: {_get(processing, 'failing')}"
    if _get(processing, "paused_for_disk"):
        return "paused (disk space under MinFreeDisk)"
    return "running" if _get(processing, "running") else "stopped"


def _reliability_fact(pinging: Any) -> str:
    """This node's reliability as the pinger's last directory has it
    (what other nodes measured, doc/reliability.md §5)."""
    if not isinstance(pinging, dict):
        return "unknown (pinging is off: the node downloads no directory)"
    downloaded = pinging.get("directory_downloaded")
    if not isinstance(downloaded, (int, float)):
        return "unknown (no directory downloaded yet)"
    own = pinging.get("reliability")
    source = f"in the directory downloaded {when(downloaded)}"
    if not isinstance(own, dict):
        return f"unmeasured {source}"
    reliability = own.get("reliability")
    shown = f"{reliability:.3f}" if isinstance(reliability, (int, float)) else "?"
    return (f"{shown}, latency {own.get('latency_ms')} ms, {own.get('pingers')} pingers "
            f"{source}")


def _reports_fact(pinging: Any) -> Optional[str]:
    """How this node's ping reports fare (None when it does not ping)."""
    if not isinstance(pinging, dict):
        return None
    text = (f"last accepted {when(pinging.get('last_report'))}; last attempt "
            f"{when(pinging.get('last_report_attempt'))}")
    error = pinging.get("last_report_error")
    return f"{text}; last error: {error}" if error else text


def status_facts(doc: dict, now: float, running: bool) -> list[str]:
    """One ``name: value`` line per fact of the status document."""
    started = doc.get("started")
    up = f" (up {duration(now - started)})" if running and isinstance(started, (int, float)) else ""
    listening = doc.get("listening")
    errors = doc.get("last_errors") if isinstance(doc.get("last_errors"), list) else []
    lines = [
        f"nickname: {doc.get('nickname')}",
        f"fingerprint: {doc.get('fingerprint')}",
        f"version: {doc.get('version')}",
        f"started: {when(started)}{up}",
        f"listening: {', '.join(map(str, listening)) if listening else 'nothing'}",
        f"keys: {_keys_fact(doc.get('keys'), now)}",
        f"next key event: {relative(doc['next_rotation'], now) if doc.get('next_rotation') else 'none'}",
        f"publication: {_publication_fact(doc.get('publication'))}",
        f"queues: {_queues_fact(doc.get('queues'))}",
        f"processing: {_processing_fact(doc.get('processing'))}",
        f"reliability: {_reliability_fact(doc.get('pinging'))}",
    ]
    reports = _reports_fact(doc.get("pinging"))
    if reports is not None:
        lines.append(f"ping reports: {reports}")
    lines.append(f"last errors: {len(errors) if errors else 'none'}")
    lines += [f"  {when(_get(e, 'time'))} {_get(e, 'level')}: {_get(e, 'message')}" for e in errors]
    lines.append(f"status written: {relative(doc.get('updated'), now)}")
    return lines


def judge_status(doc: Optional[dict], node: NodeProcess, now: float,
                 where: str = "status.json") -> tuple[list[str], int]:
    """The lines ``mixminiond status`` prints and its exit status: 0
    running and healthy, 1 running and unhealthy (or no status from this
    process yet), 3 not running.  ``where`` names the status file."""
    if not node.running:
        if doc is None:
            return [f"{node.describe()}; no status written ({where})"], EXIT_NOT_RUNNING
        head = f"not running; last status written {relative(doc.get('updated'), now)}"
        return [head, *status_facts(doc, now, running=False)], EXIT_NOT_RUNNING
    if doc is None or doc.get("pid") != node.pid:
        return [f"running (pid {node.pid}); no status written by this process yet ({where})"], \
            EXIT_FAILED
    reasons = [str(r) for r in _get(doc, "health", "reasons") or []]
    ok = _get(doc, "health", "ok") is True
    updated = doc.get("updated")
    if not isinstance(updated, (int, float)) or now - updated > STALE_AFTER:
        ok = False
        age = duration(now - updated) if isinstance(updated, (int, float)) else "ever"
        reasons.append(f"status not updated for {age} (is the node stuck?)")
    verdict = "healthy" if ok else "unhealthy: " + ("; ".join(reasons) or "no reason given")
    head = f"running (pid {node.pid}), {verdict}"
    return [head, *status_facts(doc, now, running=True)], EXIT_OK if ok else EXIT_FAILED


# --- keys -----------------------------------------------------------------------------------


def keyset_line(keyset: Keyset, now: float, overlap: float) -> str:
    """``key_0001  FROM to UNTIL  STATE  published …``."""
    state = key_state(keyset.valid_after, keyset.valid_until, now, overlap)
    if state == "overlap":
        state = f"overlap (descriptor expired; the key decrypts until {when(keyset.valid_until + overlap)})"
    published = (f"published {when(keyset.published_at)}" if keyset.published
                 else "not published")
    return (f"{keyset.name}  {when(keyset.valid_after)} to {when(keyset.valid_until)}  "
            f"{state}  {published}")


def keys_lines(fingerprint: str, keysets: Sequence[Keyset], unusable: dict[str, str],
               now: float, overlap: float) -> list[str]:
    """What ``mixminiond keys`` prints: the identity, then each keyset."""
    lines = [f"identity: {fingerprint}"]
    lines += [keyset_line(k, now, overlap) for k in keysets]
    lines += [f"{name}  unusable: {why} (the node deletes it at its next start)"
              for name, why in sorted(unusable.items())]
    if not keysets and not unusable:
        lines.append("no keysets (the node creates them at start)")
    return lines
