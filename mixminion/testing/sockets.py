"""What the machine running the tests lets a socket bind to.

Tests over real loopback sockets skip what the host cannot do: IPv6 may
be missing or disabled, and only Linux routes all of 127/8 to loopback
(other systems may only have 127.0.0.1).
"""

from __future__ import annotations

import socket


def can_bind(host: str, family: socket.AddressFamily = socket.AF_INET) -> bool:
    """Whether a TCP socket of ``family`` can be bound to ``host``."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
    except OSError:
        return False
    return True


def have_ipv6_loopback() -> bool:
    """Whether a TCP socket can be bound to ``::1``."""
    return socket.has_ipv6 and can_bind("::1", socket.AF_INET6)
