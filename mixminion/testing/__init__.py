"""Helpers for tests and benchmarks: real processes, started and watched
the same way everywhere.  :mod:`mixminion.testing.daemon` is shipped code
too: ``mixminion-testnet`` starts its network with it (it imports neither
trial nor the codec)."""
