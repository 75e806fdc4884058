"""MMTP, the Type III link protocol (spec: mmtp.md).

The layers live side by side so each can be tested alone:

* ``frames`` and ``machine``: the sans-IO state machines -- bytes in,
  events out, bytes to write; no sockets, no clock, no logging;
* the Twisted protocols, which only move bytes between a transport and a
  machine and own the timeouts;
* TLS: link certificates and the check of the responder's identity key.
"""
