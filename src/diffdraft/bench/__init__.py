"""Benchmarks: prompt suites, runners over decoders, peers and reports.

    from diffdraft.bench import BenchConfig, run_bench, report
    results = run_bench(BenchConfig(suite="mt-bench", limit=8, max_new_tokens=64, out="bench-out"))
    report("bench-out")   # rebuild results.json / .md / .png from the records already there
"""

from diffdraft.bench.runner import BenchConfig, report, run_bench

__all__ = ["BenchConfig", "report", "run_bench"]
