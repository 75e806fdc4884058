"""The node's loopback HTTP port (``[Server] MetricsPort``).

* ``/metrics``: Prometheus text from a :mod:`prometheus_client` registry of
  the node's own (not the library's global one): the process and platform
  collectors, and :class:`NodeCollector`, which reads the node at each
  scrape on the reactor thread (a few SQLite counts and a ``statvfs``).
* ``/health``: 200 ``ok``, or 503 with one reason per line
  (:func:`mixminion.server.status.health_reasons`).
* ``/status``: the JSON of :func:`mixminion.server.status.status_document`.

The site writes no access-log line per request: a scrape every 15 s
would fill the node's log with lines that say nothing.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from twisted.web.resource import Resource
from twisted.web.server import Site

import mixminion
from mixminion.codec.packet import PACKET_LEN
from mixminion.directory.reliability import Measured
from mixminion.server.clock import WALL
from mixminion.server.status import health_facts, health_reasons, keysets, processing_runs

PREFIX = "mixminion_"


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, documentation, value=value)


def _labelled(name: str, documentation: str, label: str,
              values: dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


class NodeCollector(Collector):
    """The node's own metrics, read at each scrape."""

    def __init__(self, node: Any) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        now = WALL.seconds()
        build = GaugeMetricFamily(PREFIX + "build_info", "The running version of mixminion.",
                                  labels=["version"])
        build.add_metric([mixminion.__version__], 1)
        yield build
        yield _gauge("start_time_seconds", "When the node started (UNIX time).", node.started)
        yield _gauge("uptime_seconds", "Seconds since the node started.", node.uptime())
        events = CounterMetricFamily(PREFIX + "events", "Events counted by the node "
                                     "(mixminion/events.py), kept across restarts.",
                                     labels=["event"])
        for name, value in sorted(node.stats.event_counts().items()):
            events.add_metric([name], value)
        yield events
        for queue, packets in node.queue_sizes().items():
            yield _gauge(f"queue_{queue}_packets", f"Packets in the {queue} queue.", packets)
            yield _gauge(f"queue_{queue}_bytes",
                         f"Bytes in the {queue} queue, at {PACKET_LEN} a packet (exact for "
                         "incoming and outgoing; an exit payload in the pool is smaller).",
                         packets * PACKET_LEN)
        yield _labelled("queue_deliver_packets", "Payloads waiting for each exit module.",
                        "module", node.deliver_sizes())
        yield _gauge("processing_running", "1 while processing runs.",
                     1 if processing_runs(node) else 0)
        yield _gauge("processing_paused_disk", "1 while processing waits for disk space.",
                     1 if node.processor.disk.paused else 0)
        yield _gauge("delivery_paused_disk", "Exit modules waiting for disk space.",
                     len(node.delivery.paused_modules))
        held = keysets(node)
        yield _labelled("packet_key_valid_after_seconds", "Start of each packet key's validity "
                        "(UNIX time).", "keyset", {k.name: k.valid_after for k in held})
        yield _labelled("packet_key_valid_until_seconds", "End of each packet key's validity "
                        "(UNIX time).", "keyset", {k.name: k.valid_until for k in held})
        if node.keys is not None:
            yield _gauge("next_key_event_seconds", "When keys are next generated or rotated "
                         "(UNIX time).", node.keys.next_event(now))
        yield _gauge("healthy", "1 when /health answers 200.",
                     0 if health_reasons(health_facts(node, now)) else 1)
        pinger = getattr(node, "pinger", None)
        if pinger is not None:
            yield from peer_metrics(pinger.peers())


def peer_metrics(peers: Sequence[tuple[str, Measured]]) -> Iterator[Metric]:
    """Per server the pinger measured, by nickname (1-24 characters of
    ``A-Z a-z 0-9 -``, so a safe label value; at most one per server of the
    directory) and fingerprint: the share of pings through it that came
    back, its inferred reliability, and the round trip of those that did."""
    labels = ["peer", "fingerprint"]
    families = {
        "sent": GaugeMetricFamily(PREFIX + "peer_pings", "Pings through each server in the "
                                  "pinger's last Window (settled ones).", labels=labels),
        "ratio": GaugeMetricFamily(PREFIX + "peer_ping_success_ratio", "Share of the pings "
                                   "through each server that came back.", labels=labels),
        "reliability": GaugeMetricFamily(PREFIX + "peer_reliability", "Each server's "
                                         "reliability as the pinger infers it "
                                         "(doc/reliability.md §1).", labels=labels),
        "median": GaugeMetricFamily(PREFIX + "peer_ping_latency_median_seconds", "Median "
                                    "round trip of the returned pings through each server.",
                                    labels=labels),
        "p90": GaugeMetricFamily(PREFIX + "peer_ping_latency_p90_seconds", "90th percentile "
                                 "round trip of the returned pings through each server.",
                                 labels=labels),
    }
    for nickname, m in peers:
        key = [nickname, m.fingerprint]
        families["sent"].add_metric(key, m.sent)
        families["ratio"].add_metric(key, m.returned / m.sent if m.sent else 0.0)
        families["reliability"].add_metric(key, m.reliability)
        if m.returned:
            families["median"].add_metric(key, m.median_ms / 1000)
            families["p90"].add_metric(key, m.p90_ms / 1000)
    yield from families.values()


def node_registry(node: Any) -> CollectorRegistry:
    """A registry of the node's own: process, platform and node metrics."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    registry.register(NodeCollector(node))
    return registry


class _Page(Resource):
    """One page, rendered on each GET by ``render(request) -> bytes``."""

    isLeaf = True

    def __init__(self, render: Callable[[Any], bytes]) -> None:
        super().__init__()
        self._render = render

    def render_GET(self, request) -> bytes:  # noqa: N802 - twisted.web naming
        return self._render(request)


def _text(request, content_type: str, body: bytes, code: int = 200) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"Content-Type", content_type.encode("ascii"))
    request.setHeader(b"Cache-Control", b"no-store")
    return body


INDEX = b"mixminion node: /metrics (Prometheus), /health, /status (JSON)\n"


def http_root(registry: CollectorRegistry, health: Callable[[], list[str]],
              status: Callable[[], bytes]) -> Resource:
    """``/metrics`` from ``registry``, ``/health`` from the reasons
    ``health()`` gives, ``/status`` from ``status()`` (JSON)."""
    plain = "text/plain; charset=utf-8"

    def render_health(request) -> bytes:
        reasons = health()
        if not reasons:
            return _text(request, plain, b"ok\n")
        return _text(request, plain, "".join(r + "\n" for r in reasons).encode("utf-8"), 503)

    root = Resource()
    root.putChild(b"", _Page(lambda request: _text(request, plain, INDEX)))
    root.putChild(b"metrics", _Page(lambda request: _text(
        request, CONTENT_TYPE_PLAIN_0_0_4, generate_latest(registry))))
    root.putChild(b"health", _Page(render_health))
    root.putChild(b"status", _Page(lambda request: _text(
        request, "application/json; charset=utf-8", status())))
    return root


class QuietSite(Site):
    """A :class:`Site` that logs neither each request (Twisted's access log
    goes to the node's log when no file is named) nor its start and stop."""

    noisy = False

    def log(self, request) -> None:
        pass
