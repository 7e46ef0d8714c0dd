"""Benchmarks (``make bench``): one module per figure, each with ``main() -> dict``, JSON out."""
