"""Benchmark results as files: results.json, a Markdown table, and a PNG plot.

Takes the results dict that runner.report() assembles (settings, environment, and the
figures of metrics.py per temperature) and only formats it. The plot has one row per
temperature: tau per category, speedup per category (log scale, line at 1), and the
acceptance-length histogram (log scale). matplotlib is imported only to draw, with the Agg backend.
"""

from __future__ import annotations

import json
from pathlib import Path

from diffdraft.bench.decoders import PLAIN
from diffdraft.bench.metrics import ALL, LOSSLESS_KINDS
from diffdraft.bench.quality import quality_markdown

JSON_FILE, MD_FILE, PNG_FILE = "results.json", "results.md", "results.png"


def write_reports(results: dict, out: str | Path) -> dict[str, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / JSON_FILE, "md": out / MD_FILE, "png": out / PNG_FILE}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown(results))
    plot(results, paths["png"])
    return paths


def _speculative(figures: dict) -> bool:
    return figures["draft_len"] > 0


def _references(summary: dict) -> dict[str, str]:
    """decoder -> its reference (plain decoding unless the results say otherwise, as older ones do not)."""
    return {d: summary.get("references", {}).get(d, PLAIN) for d in summary["decoders"]}


def _dllm_note(results: dict) -> list[str]:
    """What the figures mean for the dLLM's decoders, when a run has them."""
    described = results.get("decoders") or {}
    dllm = [d for d, info in described.items() if info.get("kind") == "dllm"]
    if not dllm:
        return []
    return ["", "dLLM decoders (kind dllm): the target converted into a block-diffusion LM. "
            + "; ".join(f"{d}: blocks of {described[d].get('block_size')}, {described[d].get('steps')} steps per block"
                        + (f", SimSD with a {described[d]['drafter_layers']}-layer drafter"
                           if described[d].get("drafter_layers") else ", its own decoding")
                        for d in dllm)
            + ". For them tau is tokens per target forward after the prefill (the dLLM's own decoding reveals "
            "block size / steps tokens per forward), g is the most denoising steps SimSD verifies at once, the "
            "acceptance figures count denoising steps, TTFT is the time to the first finished block, and speedup "
            "and equality are against the dLLM's own decoding in the same run (column 'reference'): at "
            "temperature 0 SimSD's tokens must equal it, so a mismatch is a bug."]


def _subset(n: int, of: int) -> str:
    return "" if n == of else f" (n={n})"


def _speed(pair: dict, digits: int = 1) -> str:
    lo, mid = pair["min_time"], pair["median_time"]
    if f"{lo:.{digits}f}" == f"{mid:.{digits}f}":
        return f"{lo:.{digits}f}"
    return f"{lo:.{digits}f} / {mid:.{digits}f}"


def markdown(results: dict) -> str:
    s = results["settings"]
    machine = results.get("machine") or {}
    versions = results.get("versions") or {}
    lines = [
        f"# diffdraft bench: {s['suite']}" + (" (second turn)" if s.get("turn") == 2 else ""),
        "",
        f"Target {s['model']} in {s['dtype']}, draft length {s['draft_len']} (unless the decoder's name says @g), "
        f"up to {s['max_new_tokens']} new tokens, seed {s['seed']}, verification {s['verify']}. "
        f"Date {results.get('date')}.",
        "",
        f"Machine: {machine.get('cpu')} ({machine.get('cpu_count')} cores, {machine.get('torch_threads')} torch "
        f"threads), {machine.get('platform')}; median 1-minute load average during the runs "
        f"{results.get('loadavg_median', 0):.2f}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in versions.items() if v) + ".",
        "",
        "tau: tokens per target forward after the prefill (bonus token included). tok/s: generated tokens "
        "over the summed per-prompt time, each prompt's time being the min / median of its timed repeats "
        "(one number when they agree). Speedup: tok/s over the engine's plain decoding on the same prompts in "
        "the same run (median-time), then the median of per-prompt speedups. TTFT: mean time to first token. "
        "Equality: prompts whose tokens equal plain decoding's at temperature 0; a mismatch of an engine "
        "decoder is a bug, a peer's is information (other kernels or weights).",
    ]
    lines += _dllm_note(results)
    skipped = results.get("skipped_peers") or {}
    if skipped:
        lines += ["", "Peers not run: " + "; ".join(f"**{n}**: {why}" for n, why in skipped.items()) + "."]
    for t, summary in results["temperatures"].items():
        lines += ["", f"## Temperature {t} ({summary['prompts']} prompts"
                  + (f"; {summary['without_plain']} prompts without plain decoding left out"
                     if summary["without_plain"] else "") + ")", ""]
        overall = summary["figures"][ALL]
        equality = summary.get("equality")
        refs = _references(summary)
        only_plain = set(refs.values()) == {PLAIN}
        header = ["decoder", "kind", "g", "prompts", "tau", "tok/s", "speedup", "speedup, median of prompts",
                  "TTFT ms"]
        if not only_plain:
            header.insert(2, "reference")
        runtimes = {d: results["decoders"].get(d, {}).get("runtime") for d in summary["decoders"]}
        with_runtime = any(runtimes.values())  # results from before runtimes were recorded have none
        if with_runtime:
            header.insert(1, "runtime")
        if equality:
            header.append("equal to plain" if only_plain else "equal to reference")
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for d in summary["decoders"]:
            f = overall[d]
            row = [d, summary["kinds"][d], str(f["draft_len"]), str(f["prompts"]), f"{f['tau']:.2f}",
                   _speed(f["tokens_per_s"]),
                   _speed(f["speedup"], 2) + "x", f"{f['speedup_median_over_prompts']:.2f}x",
                   _speed({k: v * 1000 for k, v in f["ttft_s"].items()}, 0)]
            if not only_plain:
                row.insert(2, refs[d])
            if with_runtime:
                row.insert(1, runtimes[d] or "")
            if equality:
                e = equality[d]
                mark = " **BUG**" if e["kind"] in LOSSLESS_KINDS and e["equal"] < e["total"] else ""
                row.append(f"{e['equal']}/{e['total']}{mark}")
            lines.append("| " + " | ".join(row) + " |")
        spec = [d for d in summary["decoders"] if _speculative(overall[d])]
        if PLAIN in overall:
            lines += ["", f"Plain decoding: {overall[PLAIN]['verify_ms_per_step']:.1f} ms per one-token step."]
        if spec:
            lines += ["", "Per-position acceptance (P(draft token i accepted | proposed)) and acceptance-length "
                      "histogram (verify steps accepting 0, 1, 2, ... draft tokens):", ""]
            for d in spec:
                f = overall[d]
                rates = " ".join(f"{r:.2f}" for r in f["per_position_acceptance"])
                cost = (f"; per step: draft {f['draft_ms_per_step']:.1f} ms, verify {f['verify_ms_per_step']:.1f} ms"
                        if summary["kinds"][d] == "engine" else "")
                lines.append(f"- {d}: acceptance [{rates}]; histogram {f['histogram']}{cost}")
        lines += cost_anatomy(summary, overall, spec)
        same = summary.get("same_tokens_as_plain")
        if same:
            lines += ["", ("Same tokens as plain decoding" if only_plain else "Same tokens as the decoder's reference")
                      + " with the same seed (information: a decoder sampling exactly as "
                      "plain decoding does repeats its tokens; speculative decoders draw their randomness "
                      "differently): " + ", ".join(f"{d} {e['equal']}/{e['total']}" for d, e in same.items()
                                                  if d != PLAIN) + "."]
        cats = [c for c in summary["categories"] if c in summary["figures"]]
        if len(cats) > 1:
            lines += ["", "Per category: tau / speedup (median-time) / tok/s (median-time)", "",
                      "| category | n | " + " | ".join(summary["decoders"]) + " |",
                      "|" + "---|" * (len(summary["decoders"]) + 2)]
            for c in cats:
                figs = summary["figures"][c]
                n = figs[summary["decoders"][0]]["prompts"]
                cells = [f"{figs[d]['tau']:.2f} / {figs[d]['speedup']['median_time']:.2f}x / "
                         f"{figs[d]['tokens_per_s']['median_time']:.1f}" + _subset(figs[d]["prompts"], n)
                         if d in figs else "-" for d in summary["decoders"]]
                lines.append(f"| {c} | {n} | " + " | ".join(cells) + " |")
        if equality:
            lines += ["", "Mismatches against plain decoding:" if only_plain else "Mismatches against each "
                      "decoder's reference:", ""]
            for d in summary["decoders"]:
                e = equality[d]
                if not e["mismatches"]:
                    continue
                tag = "BUG" if e["kind"] in LOSSLESS_KINDS else "information"
                shown = ", ".join(f"{m['prompt_id']} (repeat {m['repeat']}, token {m['first_diff']})"
                                  for m in e["mismatches"][:12])
                more = f", ... {len(e['mismatches']) - 12} more" if len(e["mismatches"]) > 12 else ""
                lines.append(f"- {d} ({tag}): {len(e['mismatches'])} runs differ; prompt (first differing token): "
                             f"{shown}{more}")
            if not any(equality[d]["mismatches"] for d in summary["decoders"]):
                lines.append("- none")
            bugs = summary.get("bugs", [])
            lines += ["", (f"Engine decoders differing from plain decoding: {len(bugs)}" if only_plain else
                           f"Engine and dLLM decoders differing from their reference: {len(bugs)}")
                      + (" (each one a bug to fix)." if bugs else ".")]
    lines += quality_markdown(results.get("dllm_quality") or {})
    sessions = results.get("sessions") or []
    if sessions:
        lines += ["", "## Commands", ""]
        for sess in sessions:
            lines.append(f"- `{sess.get('command') or '(Python API)'}` started {sess.get('started')}, "
                         f"ended {sess.get('ended', '(interrupted)')}")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    temps = list(results["temperatures"].items())
    if not temps:
        return
    every = list(dict.fromkeys(d for _, s in temps for d in s["decoders"]))
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(every)}
    fig, axes = plt.subplots(len(temps), 3, figsize=(18, 4.6 * len(temps)), squeeze=False,
                             gridspec_kw={"width_ratios": [2, 2, 1.2]})
    for row, (t, summary) in enumerate(temps):
        figs = summary["figures"]
        groups = [ALL] + [c for c in summary["categories"] if c in figs]
        overall = figs[ALL]
        spec = [d for d in summary["decoders"] if _speculative(overall[d])]
        others = [d for d in summary["decoders"] if d != summary["decoders"][0]]  # all but plain
        title = f"T={t}, {summary['prompts']} prompts"
        labels = {d: d + _subset(overall[d]["prompts"], summary["prompts"]) for d in summary["decoders"]}
        _bars(axes[row][0], groups, spec, lambda d, g: figs[g][d]["tau"] if d in figs[g] else 0.0, colors, labels)
        axes[row][0].axhline(1.0, color="grey", lw=0.8, ls="--")
        axes[row][0].set_ylim(0, axes[row][0].get_ylim()[1] * 1.25)  # room for the legend
        axes[row][0].set_ylabel("tau (tokens / target forward)")
        axes[row][0].set_title(f"tau per category ({title})")
        _bars(axes[row][1], groups, others,
              lambda d, g: figs[g][d]["speedup"]["median_time"] if d in figs[g] else float("nan"), colors, labels)
        axes[row][1].axhline(1.0, color="black", lw=1.0)
        _log_ratio_axis(axes[row][1])
        axes[row][1].set_ylabel("speedup vs plain (log)")
        axes[row][1].set_title(f"speedup over the engine's plain decoding ({title})" if set(_references(summary)
                               .values()) == {PLAIN} else f"speedup over each decoder's reference ({title})")
        ax = axes[row][2]
        width = 0.8 / max(1, len(spec))
        for i, d in enumerate(spec):
            hist = overall[d]["histogram"]
            total = sum(hist) or 1
            xs = [k + (i - (len(spec) - 1) / 2) * width for k in range(len(hist))]
            ax.bar(xs, [h / total for h in hist], width=width, color=colors[d], label=labels[d])
        ax.set_yscale("log")  # most steps accept nothing; the log scale shows the tail
        ax.set_xlabel("draft tokens accepted per verify step")
        ax.set_ylabel("fraction of verify steps (log)")
        ax.set_title(f"acceptance-length histogram ({title})")
        if spec:
            ax.legend(fontsize=8)
    fig.suptitle(f"diffdraft bench: {results['settings']['suite']}, {results['settings']['model']} "
                 f"{results['settings']['dtype']}, {results['settings']['max_new_tokens']} new tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _bars(ax, groups: list[str], decoders: list[str], value, colors: dict, labels: dict) -> None:
    """Grouped bars: one group per category, one bar per decoder."""
    width = 0.8 / max(1, len(decoders))
    for i, d in enumerate(decoders):
        xs = [g + (i - (len(decoders) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [value(d, g) for g in groups], width=width, color=colors[d], label=labels[d])
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=30, ha="right", fontsize=8)
    if decoders:
        ax.legend(fontsize=8, ncol=2)


def _log_ratio_axis(ax) -> None:
    """A log y axis labelled 0.5x, 1x, 2x, ..., with room above for the legend."""
    from matplotlib.ticker import NullFormatter

    ax.set_yscale("log")
    low, high = ax.get_ylim()
    low, high = min(low, 0.9), max(high, 1.1) * 2.5
    ax.set_ylim(low, high)
    ticks = [t for t in (1 / 16, 1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8, 16, 32) if low <= t <= high]
    ax.set_yticks(ticks)
    ax.set_yticklabels([f"{t:g}x" for t in ticks])
    ax.yaxis.set_minor_formatter(NullFormatter())


def cost_anatomy(summary: dict, overall: dict, spec: list[str]) -> list[str]:
    """Where a step's time goes for each engine drafter: draft and verify ms per step, the cost
    curve its length rule measured (target ms for a forward over 1, 2, ... tokens; drafter ms),
    and how often each draft length was verified."""
    engine = [d for d in spec if summary["kinds"][d] == "engine"]
    if not engine:
        return []
    lines = ["", "Cost anatomy (per verify step; the length rule's measured curve: target ms for a forward "
             "over 1, 2, ... tokens, and drafter ms per call; chosen lengths: steps that verified 0, 1, 2, ... "
             "drafted tokens):", ""]
    for d in engine:
        f = overall[d]
        curve = f.get("cost_curve")
        measured = ("; cost curve " + " ".join(f"{c:.1f}" for c in curve["target_ms"])
                    + f", drafter {curve['draft_ms']:.1f}") if curve else "; fixed length (no cost curve)"
        lines.append(f"- {d}: draft {f['draft_ms_per_step']:.1f} ms, verify {f['verify_ms_per_step']:.1f} ms"
                     f"{measured}; chosen lengths {f.get('length_histogram')}")
    return lines
