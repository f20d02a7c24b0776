"""Benchmarks: prompt suites, runners over decoders, peers and reports."""
