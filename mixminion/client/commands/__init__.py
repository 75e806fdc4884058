"""The ``mixminion-client`` commands, one module per group (client.md §2).

:mod:`mixminion.client.cli` parses the command line and runs the handler
named in its command table; the handlers live here:

* :mod:`.send` -- ``send``, ``queue``: build a message's packets (client.md §3);
  ``count-packets``: how many there would be.
* :mod:`.queue` -- ``flush``, ``inspect-queue``, ``clean-queue``, and handing
  built packets to their first hops (client.md §4).
* :mod:`.servers` -- ``list-servers``, ``update-servers``, ``import-server``
  (client.md §7-§8).
* :mod:`.surbs` -- ``generate-surb``, ``inspect-surbs`` (client.md §5.1).
* :mod:`.decode` -- ``decode`` (client.md §5.3).
* :mod:`.fragments` -- ``list-fragments``, ``reassemble``, ``purge-fragments``:
  the pool where ``decode`` reassembles fragmented messages (client.md §2.1).
* :mod:`.nym` -- ``nym create|add-surbs|send|config|status|delete|list``: the
  owner's side of nyms (doc/nym.md §6); ``decode`` shows a nymserver's
  messages with it.
* :mod:`.common` -- what several groups share: the run :class:`~.common.Context`,
  the errors that set the exit status, shared options, loading the
  directory, choosing paths, reading input and opening the keyring.
"""
