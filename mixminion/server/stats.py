"""Counters of what the node did, kept across restarts.

Counts are named events (packets received, relayed, delivered, dropped,
rejected by reason...).  They are written atomically to a JSON file every
few minutes and at shutdown, and shown on the optional metrics page.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from mixminion.mmtp.stats import MMTPStats


class NodeStats(MMTPStats):
    """MMTP's counters plus the pipeline's, loaded from and saved to
    ``path``."""

    def __init__(self, path: Optional[str] = None) -> None:
        super().__init__()
        self.path = path
        if path and os.path.exists(path):
            try:
                with open(path) as f:
                    saved = json.load(f)
            except (OSError, ValueError):
                saved = {}
            for name, value in saved.get("counts", {}).items():
                if isinstance(value, int):
                    self.counts[name] = value

    def save(self) -> None:
        """Write the counters atomically (temp file, fsync, rename)."""
        if not self.path:
            return
        tmp = self.path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": 1, "counts": dict(self.counts)}, f, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def prometheus_text(self, gauges: Optional[dict[str, float]] = None) -> str:
        """The counters in the Prometheus text exposition format."""
        lines = ["# HELP mixminion_events_total Events counted by the node.",
                 "# TYPE mixminion_events_total counter"]
        for name in sorted(self.counts):
            label = name.replace("\\", "\\\\").replace('"', '\\"')
            lines.append(f'mixminion_events_total{{event="{label}"}} {self.counts[name]}')
        for name, value in sorted((gauges or {}).items()):
            lines.append(f"# TYPE mixminion_{name} gauge")
            lines.append(f"mixminion_{name} {value}")
        return "\n".join(lines) + "\n"
