"""The client side of mixminion: what the ``mixminion-client`` command uses.

:mod:`mixminion.client.directory` is the client's view of the network: the
directory downloaded from the authorities, checked against pinned
authority fingerprints, cached on disk, plus descriptors imported by hand
(client.md §8, descriptors.md §8).

:mod:`mixminion.client.cli` is the command itself (parsing and the command
table); the commands live in :mod:`mixminion.client.commands`, one module
per group.
"""
