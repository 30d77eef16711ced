"""Benchmarks: each measures this project and its baseline in the same process run (`python -m benchmarks`)."""
