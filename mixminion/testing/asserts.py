"""Assertions trial does not have.

trial's ``assertAlmostEqual`` takes ``delta`` but ignores it (it rounds
to ``places``), so a test meaning "within 125" silently demanded
equality; :meth:`NearAssertions.assertNear` means what it says.
"""

from __future__ import annotations

from typing import Any


class NearAssertions:
    """Mix into a ``TestCase``."""

    def assertNear(self: Any, value: float, target: float, delta: float,  # noqa: N802
                   msg: str = "") -> None:
        """``value`` is within ``delta`` of ``target``."""
        self.assertLessEqual(abs(value - target), delta,
                             f"{value!r} is not within {delta} of {target!r} {msg}".rstrip())
