"""Nyms (doc/nym.md): the formats a nym's owner and its nymserver share.

Pure, like the codec: no Twisted, no I/O, no clock.  The client builds
requests and reads what the nymserver sends; the nymserver (the ``NYM``
exit module, :mod:`mixminion.exits.nym`) does the opposite.
"""
