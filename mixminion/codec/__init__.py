"""The Type III codec: packet formats, building, processing and decoding.

Everything under this package is pure: functions and small objects over
bytes, with randomness passed in by the caller.  Nothing here imports
Twisted, opens a socket or file, or reads the clock, so the same code serves
the server, the client and the test-vector runner.
"""
