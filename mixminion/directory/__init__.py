"""Descriptors, directories and the directory authority (spec: descriptors.md).

The formats are pure code -- text in, objects out, the validation time and
the signing randomness passed in: :mod:`~mixminion.directory.descriptor`
(server descriptors), :mod:`~mixminion.directory.directory` (directories)
and :mod:`~mixminion.directory.voting` (votes and the consensus).  The
authority around them keeps state and talks HTTP with Twisted:
:mod:`~mixminion.directory.authority` (its store),
:mod:`~mixminion.directory.service` (the voting schedule and publication),
:mod:`~mixminion.directory.httpserver` and
:mod:`~mixminion.directory.tap` (``twistd mixminion-directory``).
"""
