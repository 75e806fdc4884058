"""Helpers for tests and benchmarks: real processes, started and watched
the same way everywhere."""
