"""Measure what a step costs on this machine: the target's forward over k tokens, and one drafter call.

The length rule (draft_length.py) needs c(1..K) and d. They are properties of the machine,
the model, the backend, the dtype, the weights and the thread count, so they are measured once (a few
forwards per k, the median of a few rounds: seconds) and cached as JSON in the cache
folder under a key made of all of those. The measurement runs on synthetic token ids over
a short context; it touches no request. Knows nothing of verification.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import sys
import time

import torch

from diffdraft.backends.kernels import cpuinfo_field
from diffdraft.config import SamplingConfig
from diffdraft.draft_length import CostCurve
from diffdraft.loading import cache_dir

CONTEXT = 128  # tokens of context behind the timed forwards
REPEATS = 3
# The target's rounds stop once they have taken this long (at least one round runs): a slow machine or
# a busy one gets a rougher curve in bounded time rather than minutes of measuring.
BUDGET_S = 20.0
CURVE_VERSION = 6  # 5: the drafter cost per further token; 6: drafter steps timed as decoding runs them
OPENMP_SETTINGS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_NUM_THREADS")


def machine_id() -> str:
    """The CPU model and core count (and the GPU, when the target runs on one)."""
    cpu = cpuinfo_field("model name") or platform.processor() or platform.machine()
    return f"{cpu} x{os.cpu_count()}"


def _key(target, drafter, max_tokens: int) -> dict:
    device = target.device
    return {
        "version": CURVE_VERSION,
        "machine": machine_id() + (f" {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        # how idle OpenMP threads wait changes a small forward's cost by half (diffdraft/__init__.py)
        "openmp": {name: os.environ.get(name) for name in OPENMP_SETTINGS},
        "model": f"{target.name}:{target.num_layers}x{target.hidden_size}:{target.vocab_size}",
        "backend": target.kind,
        "dtype": str(target.dtype),
        "weights": target.weights,  # 4-bit linears have their own cost curve
        "half_head": target.half_head,  # so has a float16 LM head (and the drafter that follows it)
        "fused_build": target.fused_build,  # and the fused C++ layers, by the build of their code
        "drafter": None if drafter is None else drafter.cost_id(),
        "max_tokens": max_tokens,
    }


def median_time(run, repeats: int = 2 * REPEATS + 1) -> float:
    """Seconds of one call of `run`: the median of `repeats` timed calls."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def context_ids(target, k: int) -> torch.Tensor:
    """Synthetic ids: CONTEXT (or what the model holds) + k, cycling through ordinary token ids."""
    length = min(CONTEXT, max(1, target.max_context - k - 1))
    return (torch.arange(length + k, dtype=torch.long) * 7919 % max(2, target.vocab_size - 1))[None]


def measure_target(target, max_tokens: int, rounds: int = 2 * REPEATS + 1, budget_s: float = BUDGET_S
                   ) -> tuple[float, ...]:
    """c(1..max_tokens): seconds of a forward over k tokens after CONTEXT tokens.

    The k are timed in rounds, each round over every k, so a burst of load on a shared machine
    hits them all alike; each c(k) is its median over the rounds, and the curve is then made
    non-decreasing (a forward over more tokens never costs less; a dip is noise). Rounds stop
    after budget_s seconds (at least one runs)."""
    ids = context_ids(target, max_tokens)
    context = ids.shape[1] - max_tokens
    state = target.new_state()
    target.prefill(state, ids[:, :context])
    target.forward(state, ids[:, context : context + max_tokens])  # warm up
    times: list[list[float]] = [[] for _ in range(max_tokens)]
    began = time.perf_counter()
    for round_ in range(rounds):
        if round_ and time.perf_counter() - began > budget_s:
            break
        for k in range(1, max_tokens + 1):
            target.crop(state, context)
            start = time.perf_counter()
            target.forward(state, ids[:, context : context + k])
            if target.device.type == "cuda":
                torch.cuda.synchronize()
            times[k - 1].append(time.perf_counter() - start)
    medians = torch.tensor([sorted(t)[len(t) // 2] for t in times], dtype=torch.float64)
    return tuple(medians.cummax(dim=0).values.tolist())


def measure_drafter(target, drafter, max_tokens: int, repeats: int = 2 * REPEATS + 1) -> tuple[float, float]:
    """(d(1), what each further token adds): seconds of a drafter step as decoding runs one, asking for one token
    and for `max_tokens`, after CONTEXT tokens: right after a target forward (whose weights push the drafter's
    out of the CPU's caches), the drafter takes in the token that forward committed, then proposes. The median
    of `repeats` steps each; the second figure becomes a cost per further token (never below 0)."""
    ids = context_ids(target, 2)
    seq = ids[0, :-1].tolist()  # what the drafter proposes after; the last id only feeds the target's forward
    target_state = target.new_state()
    taps = target.prefill(target_state, ids[:, :-1], want_taps=drafter.wants_taps).taps
    before, last = (None, None) if taps is None else (taps[:, :-2], taps[:, -2:-1])
    generator, greedy = torch.Generator().manual_seed(0), SamplingConfig()

    def step(count: int) -> float:
        state = drafter.new_state()
        drafter.begin(state, seq[:-2], before)
        target.forward(target_state, ids[:, -1:])  # as in decoding, the target's forward comes first
        target.crop(target_state, len(seq))
        start = time.perf_counter()
        drafter.observe(state, last)
        drafter.propose(state, seq, count, greedy, generator)
        if target.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    def median(count: int) -> float:
        return sorted(step(count) for _ in range(repeats))[repeats // 2]

    step(max_tokens)  # warm up
    one = median(1)
    if max_tokens == 1:
        return one, 0.0
    return one, max(median(max_tokens) - one, 0.0) / (max_tokens - 1)


def cost_curve(target, drafter, max_tokens: int, use_cache: bool = True) -> CostCurve:
    """c(1..max_tokens + 1) and d for this machine, target and drafter, from the cache or measured."""
    key = _key(target, drafter, max_tokens)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir() / "costs" / f"{digest}.json"
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            if data.get("key") == key:
                return CostCurve(tuple(data["target_s"]), data["draft_s"], data["draft_slot_s"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # a damaged cache entry: measure again
    if use_cache:
        print(f"diffdraft: measuring this machine's step costs for the length rule (once: kept in {path.parent})",
              file=sys.stderr)
    drafting = (0.0, 0.0) if drafter is None or max_tokens == 0 else measure_drafter(target, drafter, max_tokens)
    curve = CostCurve(measure_target(target, max_tokens + 1), *drafting)
    if use_cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "target_s": curve.target_s, "draft_s": curve.draft_s,
                                   "draft_slot_s": curve.draft_slot_s}) + "\n")
        os.replace(tmp, path)  # whole or not at all
    return curve
