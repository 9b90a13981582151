"""Metrics, logs and health: every metric is declared once in ``metrics``."""
