"""Benchmarks behind `rayllm bench`: measurements, never tests."""
