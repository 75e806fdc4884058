"""Configuration files: one syntax, one set of value types, one way to
declare options, shared by the node, the directory authority, the client
and the exit modules.

* :mod:`~mixminion.config.syntax`: sections and entries; :class:`ConfigError`;
* :mod:`~mixminion.config.values`: the value types (BOOLEAN, INTERVAL, SIZE...);
* :mod:`~mixminion.config.intervals`: intervals and retry schedules;
* :mod:`~mixminion.config.schema`: :class:`Option` and :class:`SectionSpec`.

No Twisted and no I/O beyond what a value type checks (a user name).
"""
