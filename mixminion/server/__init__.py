"""The mix server: the parts that keep state on disk or talk to the network
(replay logs, queues, MMTP, delivery), built around the pure codec in
:mod:`mixminion.codec`."""
