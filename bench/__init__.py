"""Benchmarks: speed and memory as ratios (RESULTS.md), quality against the baselines (QUALITY.md)."""
