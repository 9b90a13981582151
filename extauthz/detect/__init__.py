"""Extraction detectors: pure functions over bounded per-client state, one score and reason each."""
