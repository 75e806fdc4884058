"""The pinger's logic (doc/reliability.md §1), one job per module.

* :mod:`.schedule` -- when pings leave (a Poisson process) and the service
  that calls the pinger at those times;
* :mod:`.paths` -- which server to measure next and the path ``X, S, Y``;
* :mod:`.handles` -- the 20-byte handle a ping's PING exit carries;
* :mod:`.store` -- the durable record of pings in ``WorkDir/pings.db``;
* :mod:`.inference` -- per-server reliability and latency from the record.

Nothing here builds or sends packets: the node wires these together.
"""
