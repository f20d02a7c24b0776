"""Decoding under concurrency: `diffdraft bench --concurrency 1 4 8 16`.

At each level C, each engine decoder (plain decoding, then one per drafter) answers every
prompt of the suite through one continuous batch (diffdraft.batching) of at most C requests:
C in flight from the start, the next admitted as soon as one ends, like C clients that each
send their next request when the last one is answered. Levels and decoders alternate per
temperature so that machine noise falls on all of them alike.

Reported per (temperature, decoder, C): total tokens per second over the wall time;
per-request tokens per second (its tokens over its time in the batch); latency p50 / p95
(admission to last token); time to first token; tau; the mean requests and rows per step (what
the length rule chose to verify, summed over the batch); the speedup over plain decoding at
the same C, and over plain decoding at C = 1. Every answer is checked against the same
prompt's answer by plain decoding at C = 1: at T = 0 they must be equal (lossless, and
batch-invariant rows); at T > 0 equality is expected only where verification is point-mass.
Writes concurrency.json and concurrency.md into the output folder. Knows nothing of HTTP.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

from diffdraft.batching import run_batched
from diffdraft.bench.decoders import engine_decoders
from diffdraft.bench.metrics import temperature_key
from diffdraft.bench.runner import bench_targets, environment, prompt_seed
from diffdraft.config import SamplingConfig
from diffdraft.decoding import PLAIN, EngineDecoder
from diffdraft.errors import DiffdraftError
from diffdraft.backends.kernels import cpu_capability
from diffdraft.prompting import chat_ids
from diffdraft.suites import Prompt

WARMUP_TOKENS = 16


def check_levels(levels: list[int]) -> list[int]:
    if not levels or any(isinstance(c, bool) or not isinstance(c, int) or c < 1 for c in levels):
        raise DiffdraftError(f"concurrency levels must be positive integers, got {levels}")
    if len(set(levels)) != len(levels):
        raise DiffdraftError(f"concurrency levels repeat: {levels}")
    return sorted(levels)


def run_level(decoder: EngineDecoder, prompts: list[list[int]], seeds: list[int], sampling: SamplingConfig,
              level: int, max_new_tokens: int) -> dict:
    """Every prompt through one batch of at most `level` requests; per-request records and the step sizes."""
    admitted, records = {}, {}
    sizes = {"batch_steps": 0, "rows": 0, "sequences": 0}

    def begin(index: int):
        admitted[index] = time.perf_counter()  # its prefill counts in its latency
        return decoder.begin(prompts[index], max_new_tokens, sampling, seeds[index])

    def count(report) -> None:
        if report.sequences:
            sizes["batch_steps"] += 1
            sizes["rows"] += report.rows
            sizes["sequences"] += report.sequences

    start = time.perf_counter()
    begins = [lambda i=i: begin(i) for i in range(len(prompts))]
    for index, emitted, generation in run_batched(decoder.target, begins, level, on_step=count):
        if emitted is None:
            result = generation.result()
            records[index] = {"tokens": result.tokens, "stop_reason": result.stop_reason,
                              "latency_s": time.perf_counter() - admitted[index], "ttft_s": result.stats.ttft_s,
                              "steps": result.stats.steps, "emitted": sum(result.stats.emitted)}
    wall = time.perf_counter() - start
    return {"wall_s": wall, "records": [records[i] for i in range(len(prompts))], **sizes}


def _pct(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def summarize_level(run: dict) -> dict:
    records = run["records"]
    tokens = sum(len(r["tokens"]) for r in records)
    latencies = [r["latency_s"] for r in records]
    steps = sum(r["steps"] for r in records)
    return {
        "requests": len(records), "tokens": tokens, "wall_s": round(run["wall_s"], 3),
        "tokens_per_s": round(tokens / run["wall_s"], 2),
        "per_request_tokens_per_s": round(statistics.median(len(r["tokens"]) / r["latency_s"] for r in records), 2),
        "latency_p50_s": round(_pct(latencies, 50), 3), "latency_p95_s": round(_pct(latencies, 95), 3),
        "ttft_p50_s": round(_pct([r["ttft_s"] for r in records], 50), 4),
        "tau": round(sum(r["emitted"] for r in records) / steps, 3) if steps else 0.0,
        "requests_per_step": round(run["sequences"] / run["batch_steps"], 2) if run["batch_steps"] else 0.0,
        "rows_per_step": round(run["rows"] / run["batch_steps"], 2) if run["batch_steps"] else 0.0,
    }


def run_concurrency(config, prompts: list[Prompt], levels: list[int]) -> dict:
    """The concurrency benchmark of a BenchConfig (its suite, model, drafters, temperatures, tokens)."""
    levels = check_levels(levels)
    if config.threads:
        torch.set_num_threads(config.threads)
    target = bench_targets(config, config.weights[:1])[0]  # the first weight choice: the one drafters run on
    decoders = engine_decoders(list(config.drafters), target, config.draft_len, config.verify,
                               config.early_exit_layers)
    ids = [chat_ids(target, p.turns[0]) for p in prompts]
    seeds = [prompt_seed(config.seed, p.id) for p in prompts]
    results = {"command": config.command, "suite": config.suite, "prompts": len(prompts), "levels": levels,
               "max_new_tokens": config.max_new_tokens, "runtime": target.runtime,
               "threads": torch.get_num_threads(), "decoders": [d.describe() for d in decoders],
               "cpu_capability": cpu_capability(), **environment(), "temperatures": {}}
    for t in config.temperatures:
        sampling = SamplingConfig(temperature=t)
        if config.warmup:
            for d in decoders:
                run_level(d, ids[:2], seeds[:2], sampling, 2, min(WARMUP_TOKENS, config.max_new_tokens))
        figures: dict[str, dict[int, dict]] = {d.name: {} for d in decoders}
        answers: dict[str, dict[int, list]] = {d.name: {} for d in decoders}
        for level in levels:
            for d in decoders:  # levels outside, decoders inside: each level's comparison is side by side
                run = run_level(d, ids, seeds, sampling, level, config.max_new_tokens)
                figures[d.name][level] = summarize_level(run)
                answers[d.name][level] = [r["tokens"] for r in run["records"]]
                f = figures[d.name][level]
                print(f"diffdraft bench: T={temperature_key(t)} C={level} {d.name}: {f['tokens_per_s']:.1f} tok/s, "
                      f"latency p50 {f['latency_p50_s']:.2f} s, tau {f['tau']:.2f}, "
                      f"{f['rows_per_step']:.1f} rows/step", file=sys.stderr)
        reference = answers[PLAIN][levels[0]]
        for name, by_level in figures.items():
            for level, f in by_level.items():
                plain_here = figures[PLAIN][level]["tokens_per_s"]
                f["speedup_vs_plain_same_c"] = round(f["tokens_per_s"] / plain_here, 3)
                f["speedup_vs_plain_c1"] = round(f["tokens_per_s"] / figures[PLAIN][levels[0]]["tokens_per_s"], 3)
                f["equal_to_plain"] = sum(a == b for a, b in zip(answers[name][level], reference))
        results["temperatures"][temperature_key(t)] = figures
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "concurrency.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "concurrency.md").write_text(markdown(results))
    return results


def markdown(results: dict) -> str:
    lines = [f"# Decoding under concurrency: {results['suite']}, {results['prompts']} prompts, "
             f"{results['max_new_tokens']} new tokens",
             "", f"`{results['command']}`", "",
             f"Runtime: {results['runtime']}, {results['threads']} threads; CPU: {results['machine']['cpu']} "
             f"({results['cpu_capability']}).", ""]
    for t, figures in results["temperatures"].items():
        lines += [f"## T = {t}", "",
                  "| decoder | C | tok/s | per-request tok/s | latency p50 / p95 (s) | TTFT p50 (ms) | tau | "
                  "requests / step | rows / step | vs plain, same C | vs plain, C = 1 | equal to plain |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for level in results["levels"]:
            for name, by_level in figures.items():
                f = by_level[level] if level in by_level else by_level[str(level)]
                lines.append(f"| {name} | {level} | {f['tokens_per_s']:.1f} | {f['per_request_tokens_per_s']:.1f} | "
                             f"{f['latency_p50_s']:.2f} / {f['latency_p95_s']:.2f} | {f['ttft_p50_s'] * 1000:.0f} | "
                             f"{f['tau']:.2f} | {f['requests_per_step']:.1f} | {f['rows_per_step']:.1f} | "
                             f"{f['speedup_vs_plain_same_c']:.2f}x | {f['speedup_vs_plain_c1']:.2f}x | "
                             f"{f['equal_to_plain']}/{f['requests']} |")
        lines.append("")
    return "\n".join(lines)
