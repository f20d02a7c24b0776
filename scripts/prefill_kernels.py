"""Prefill time of the default target on native 4-bit weights: without the bfloat16 copy (the 4-bit kernel),
with long prefills on it (bulk kernels, backends/kernels.py BulkLinear) in the Python layers, and in the fused
C++ stack (the default where it builds), for prompts of several lengths, side by side in one run: median of
interleaved rounds, 2 threads. A benchmark that prints ms, not a test.
Usage: .venv/bin/python scripts/prefill_kernels.py [--lengths 16 32 96 200 400]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from diffdraft.api import use_threads
from diffdraft.backends import build_target
from diffdraft.backends.kernels import cpu_capability
from diffdraft.loading import gguf_path, load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 96, 200, 400])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    use_threads(args.threads)
    model, tokenizer = load_model(None)
    targets = {name: build_target(model, tokenizer, backend="lean", weights="native", gguf=gguf_path(None),
                                  report=lambda line: None, bulk_prefill=bulk, fused=fused)
               for name, bulk, fused in (("4-bit kernel", False, True), ("bulk, Python", True, False),
                                         ("bulk, fused", True, True))}
    if not targets["bulk, fused"].bulk_prefill:
        print(f"this CPU ({cpu_capability()}) runs no bfloat16 oneDNN kernel: every prefill stays on the 4-bit kernel")
    ids = torch.randint(100, 40000, (1, max(args.lengths)), generator=torch.Generator().manual_seed(0))
    times = {(name, n): [] for name in targets for n in args.lengths}
    for _ in range(args.rounds):  # interleaved, so a burst of load hits both alike
        for n in args.lengths:
            for name, target in targets.items():
                state = target.new_state(n + 1)
                began = time.perf_counter()
                target.prefill(state, ids[:, :n])
                times[name, n].append(time.perf_counter() - began)
    print(f"prefill ms, median of {args.rounds} rounds, {args.threads} threads, CPU capability {cpu_capability()}")
    print(f"{'tokens':>7}" + "".join(f"{name:>14}" for name in targets) + "  (ms; the last column's speedup over each)")
    for n in args.lengths:
        ms = [1000 * statistics.median(times[name, n]) for name in targets]
        print(f"{n:>7}" + "".join(f"{value:>14.1f}" for value in ms) + "  "
              + " ".join(f"{value / ms[-1]:.2f}x" for value in ms[:-1]))


if __name__ == "__main__":
    main()
