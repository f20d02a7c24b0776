"""Benchmark figures from records: tau, speed, speedup, TTFT, acceptance, output equality.

Pure arithmetic over the records of store.py (plain dicts); knows nothing of models.

Per temperature, each decoder is measured against its reference: the engine's plain
decoding, except for the dLLM's decoders, whose reference is the dLLM's own decoding
(decoders.py). It is measured on the prompts that it, its reference and plain decoding
all answered (all of them in a full run; a subset when a slow decoder ran on fewer).
For each decoder and group (a category, or all):
- tau, acceptance histogram, per-position acceptance: from the merged Stats traces of
  every prompt and repeat (diffdraft.stats.Stats.merge).
- tokens/s: generated tokens over the summed time, where each prompt's time is its
  minimum over the timed repeats ("min_time") or its median ("median_time"); with one
  repeat both are the same.
- speedup: that tokens/s over its reference's (same prompts, same statistic); also the
  median over prompts of the per-prompt speedup, which shrugs off bursts of load.
- TTFT: mean over prompts of each prompt's min / median time to first token.
- equality (temperature 0): every run's tokens against its reference's first run; a
  mismatch of a lossless decoder (kinds "engine" and "dllm") is a bug. Above 0
  the same count is kept as information ("same_tokens_as_plain"): with the same seed, a
  decoder that samples exactly as plain decoding does (HF generate) gives the same tokens,
  while speculative decoders draw their randomness differently.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass
from functools import reduce

from diffdraft.bench.decoders import PLAIN
from diffdraft.bench.store import stats_from_dict
from diffdraft.stats import Stats

ALL = "all"
LOSSLESS_KINDS = ("engine", "dllm")  # decoders whose temperature-0 output must equal their reference's


def temperature_key(temperature: float) -> str:
    return f"{float(temperature):g}"


@dataclass
class Mismatch:
    prompt_id: str
    category: str
    repeat: int
    first_diff: int  # index of the first differing token (the shorter length if one is a prefix)
    reference_len: int
    output_len: int


def first_difference(reference: list[int], output: list[int]) -> int | None:
    """Index of the first differing token, or None when the two are equal."""
    for i, (a, b) in enumerate(zip(reference, output)):
        if a != b:
            return i
    return None if len(reference) == len(output) else min(len(reference), len(output))


def check_equality(reference: dict[str, list[int]], outputs: dict[str, list[list[int]]],
                   categories: dict[str, str] | None = None) -> list[Mismatch]:
    """Mismatches of outputs[prompt][repeat] against reference[prompt], over the reference's prompts."""
    categories = categories or {}
    found = []
    for pid, ref in reference.items():
        for repeat, out in enumerate(outputs.get(pid, [])):
            diff = first_difference(ref, out)
            if diff is not None:
                found.append(Mismatch(pid, categories.get(pid, ""), repeat, diff, len(ref), len(out)))
    return found


def _time_stat(values: list[float], how: str) -> float:
    return min(values) if how == "min_time" else statistics.median(values)


def decoder_figures(runs_by_prompt: dict[str, list[dict]], plain_by_prompt: dict[str, list[dict]]) -> dict:
    """Figures for one decoder over a set of prompts.

    runs_by_prompt[pid]: this decoder's runs ({"tokens", "stats"}) on prompt pid;
    plain_by_prompt[pid]: plain decoding's runs on the same prompts.
    """
    pids = list(runs_by_prompt)
    merged = reduce(Stats.merge, (stats_from_dict(r["stats"]) for pid in pids for r in runs_by_prompt[pid]))
    figures = merged.to_dict()
    for key in ("new_tokens", "runs", "mean_ttft_s", "total_s", "draft_s", "verify_s", "tokens_per_s"):
        figures.pop(key)  # pooled over repeats these mislead; the speed figures follow
    # where the time of a step goes (the engine's decoders time both; peers report neither)
    figures["draft_ms_per_step"] = 1000 * merged.draft_s / merged.steps if merged.steps else 0.0
    figures["verify_ms_per_step"] = 1000 * merged.verify_s / merged.steps if merged.steps else 0.0
    figures["prompts"] = len(pids)
    figures["repeats"] = min(len(runs_by_prompt[pid]) for pid in pids)
    tokens = {pid: runs_by_prompt[pid][0]["stats"]["new_tokens"] for pid in pids}
    plain_tokens = {pid: plain_by_prompt[pid][0]["stats"]["new_tokens"] for pid in pids}
    figures["new_tokens"] = sum(tokens.values())
    speed, speedup, ttft = {}, {}, {}
    for how in ("min_time", "median_time"):
        times = {pid: _time_stat([r["stats"]["total_s"] for r in runs_by_prompt[pid]], how) for pid in pids}
        plain_times = {pid: _time_stat([r["stats"]["total_s"] for r in plain_by_prompt[pid]], how) for pid in pids}
        speed[how] = _rate(sum(tokens.values()), sum(times.values()))
        plain_speed = _rate(sum(plain_tokens.values()), sum(plain_times.values()))
        speedup[how] = speed[how] / plain_speed if plain_speed > 0 else 0.0
        ttft[how] = statistics.fmean(
            _time_stat([r["stats"]["ttft_s"] for r in runs_by_prompt[pid]], how) for pid in pids
        )
        if how == "median_time":
            per_prompt = [
                _rate(tokens[pid], times[pid]) / _rate(plain_tokens[pid], plain_times[pid])
                for pid in pids if _rate(plain_tokens[pid], plain_times[pid]) > 0
            ]
            figures["speedup_median_over_prompts"] = statistics.median(per_prompt) if per_prompt else 0.0
    figures["tokens_per_s"] = speed
    figures["speedup"] = speedup
    figures["ttft_s"] = ttft
    return figures


def _rate(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else 0.0


def summarize_temperature(records: list[dict], decoder_order: list[str],
                          references: dict[str, str] | None = None) -> dict:
    """Figures for the records of one temperature: overall, per category, and equality at T=0.

    references[d] is the decoder d is compared with (default: plain decoding). Each decoder
    is measured on the prompts that it, its reference and plain decoding answered, so a
    decoder run on a subset still gets a fair speedup; its figures say how many prompts.
    """
    table: dict[str, dict[str, dict]] = {}  # decoder -> prompt -> record
    categories: dict[str, str] = {}
    kinds: dict[str, str] = {}
    for r in records:
        table.setdefault(r["decoder"], {})[str(r["prompt_id"])] = r
        categories[str(r["prompt_id"])] = r.get("category", "")
        kinds[r["decoder"]] = r.get("kind", "engine")
    if PLAIN not in table:
        raise ValueError("no plain-decoding records: speedup and equality need the engine's plain decoding")
    decoders = [d for d in decoder_order if d in table] + sorted(d for d in table if d not in decoder_order)
    refs = {d: (references or {}).get(d, PLAIN) for d in decoders}
    missing = sorted({r for r in refs.values() if r not in table})
    if missing:
        raise ValueError(f"no records of {', '.join(missing)}, the reference of another decoder")
    reference = list(table[PLAIN])  # prompts in the order plain decoding answered them
    answered = {d: [pid for pid in reference if pid in table[d] and pid in table[refs[d]]] for d in decoders}
    category_order = list(dict.fromkeys(categories[pid] for pid in reference))

    result = {
        "decoders": decoders,
        "kinds": {d: kinds[d] for d in decoders},
        "references": refs,
        "prompts": len(reference),
        "prompts_per_decoder": {d: len(answered[d]) for d in decoders},
        "without_plain": len(set().union(*(table[d].keys() for d in decoders)) - set(reference)),
        "categories": category_order,
        "figures": {},
    }
    for group in [ALL, *category_order]:
        figures = {}
        for d in decoders:
            pids = [pid for pid in answered[d] if group == ALL or categories[pid] == group]
            if pids:
                figures[d] = decoder_figures({pid: table[d][pid]["runs"] for pid in pids},
                                             {pid: table[refs[d]][pid]["runs"] for pid in pids})
        result["figures"][group] = figures
    equality = {}
    for d in decoders:
        ref = {pid: table[refs[d]][pid]["runs"][0]["tokens"] for pid in answered[d]}
        outputs = {pid: [run["tokens"] for run in table[d][pid]["runs"]] for pid in answered[d]}
        found = check_equality(ref, outputs, categories)
        unequal = {m.prompt_id for m in found}
        equality[d] = {
            "kind": kinds[d],
            "equal": len(answered[d]) - len(unequal),
            "total": len(answered[d]),
            "mismatches": [asdict(m) for m in found],
        }
    if float(records[0]["temperature"]) == 0:
        result["equality"] = equality
        result["bugs"] = [
            {"decoder": d, "reference": refs[d], **m}
            for d in decoders if kinds[d] in LOSSLESS_KINDS for m in equality[d]["mismatches"]
        ]
    else:  # information only: with the same seed, a decoder that samples as its reference does gives the same tokens
        result["same_tokens_as_plain"] = {d: {"equal": e["equal"], "total": e["total"]} for d, e in equality.items()}
    return result


def summarize(records: list[dict], decoder_order: list[str], references: dict[str, str] | None = None) -> dict:
    """{temperature key: summarize_temperature(...)} over every temperature in the records."""
    by_temperature: dict[str, list[dict]] = {}
    for r in sorted(records, key=lambda r: float(r["temperature"])):
        by_temperature.setdefault(temperature_key(r["temperature"]), []).append(r)
    return {t: summarize_temperature(rs, decoder_order, references) for t, rs in by_temperature.items()}
