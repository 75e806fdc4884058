"""Unit tests of mixminion (run with ``trial mixminion``)."""
