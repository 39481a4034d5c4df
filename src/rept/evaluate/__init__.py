"""Evaluation: retrieval metrics (metrics) and the benchmark (bench)."""
