"""Exceptions of the exit-module layer.

Like magic-wormhole's ``errors.py``, each docstring is the message an
operator reads, so keep them plain.
"""

from __future__ import annotations


class ExitError(Exception):
    """Base class of the exit-module errors."""


class ExitConfigError(ExitError):
    """A delivery section of the configuration is wrong; the node must not
    start with it."""


class MissingExitModule(ExitConfigError):
    """The configuration asks for an exit module that no installed plugin
    provides."""


class BrokenExitPlugin(ExitConfigError):
    """An exit-module plugin does not implement the interface it claims."""


class UndeliverableItem(ExitError):
    """A delivery item cannot be built from what processing produced (for
    example routing info too short to hold the 20-byte decoding handle);
    the payload is dropped."""
