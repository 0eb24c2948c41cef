"""Durable formats: activation shards, SAE artifacts, checkpoints, the DuckDB feature index, run folders.

Knows no models (imports nothing from ``pipeline``).
"""
