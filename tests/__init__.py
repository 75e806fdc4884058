"""Tests that start real processes (run by ``scripts/test.sh`` with trial)."""
