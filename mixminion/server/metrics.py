"""An optional Prometheus ``/metrics`` page, on a loopback port only."""

from __future__ import annotations

from typing import Callable

from twisted.web.resource import Resource


class MetricsResource(Resource):
    """Renders the node's counters and gauges on each request (cheap: a
    few dozen lines), in the Prometheus text format."""

    isLeaf = True

    def __init__(self, render_text: Callable[[], str]) -> None:
        super().__init__()
        self.render_text = render_text

    def render_GET(self, request) -> bytes:  # noqa: N802 - twisted.web naming
        request.setHeader(b"Content-Type", b"text/plain; version=0.0.4; charset=utf-8")
        return self.render_text().encode("utf-8")


def metrics_root(render_text: Callable[[], str]) -> Resource:
    root = Resource()
    root.putChild(b"metrics", MetricsResource(render_text))
    return root
