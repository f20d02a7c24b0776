"""The matmul floor of one decoding step: every linear of SmolLM2 (its 30 layers' q/k/v/o, gate/up/down,
and the LM head) over 1, 2, 4 and 16 rows, through F.linear (what HF runs) and through the prepared
oneDNN linears (what the lean runtime runs), at 1 and 2 threads. Median of interleaved rounds.
Prints ms per pass; a benchmark, not a test.  Usage: .venv/bin/python scripts/linear_floor.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F

from diffdraft.backends.kernels import PreparedLinear
from diffdraft.loading import load_model


def main() -> None:
    model, _ = load_model(None, dtype="float32")
    weights = [m.weight.detach() for m in model.modules() if isinstance(m, torch.nn.Linear)]
    prepared = [PreparedLinear(w) for w in weights]
    print(f"{len(weights)} linears, {sum(w.numel() for w in weights) / 1e6:.1f} M weights "
          f"({sum(w.numel() for w in weights) * 4 / 2**20:.0f} MiB in float32)")
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for rows in (1, 2, 4, 16):
            xs = {w.shape[1]: torch.randn(1, rows, w.shape[1]) for w in weights}
            plain, lean = [], []
            for _ in range(7):
                for fn, out in ((lambda: [F.linear(xs[w.shape[1]], w) for w in weights], plain),
                                (lambda: [p(xs[p.in_features]) for p in prepared], lean)):
                    tick = time.perf_counter()
                    fn()
                    out.append((time.perf_counter() - tick) * 1000)
            print(f"threads {threads}, rows {rows:2d}: F.linear {statistics.median(plain):6.1f} ms, "
                  f"prepared oneDNN {statistics.median(lean):6.1f} ms "
                  f"({statistics.median(plain) / statistics.median(lean):.2f}x)")


if __name__ == "__main__":
    with torch.inference_mode():
        main()
