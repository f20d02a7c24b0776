"""The objective ablation of issue 6 as one Markdown table.

Joins a bench folder's results.json (tau and speedup per decoder and temperature) with each
row's training record (`NAME.drafter.json`, written by `diffdraft train`, copied from the run):
the objective it was trained with, and its simulated tau and held-out loss at the last step.
A decoder `abl-NAME...@G` belongs to the row NAME. It knows nothing about how the rows were
trained beyond what those files say.

    python scripts/ablation_table.py results/ablation-mtbench results/training/ablation
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def objective(config: dict) -> str:
    """The objective flags a row was trained with, as `diffdraft train` spells them."""
    if config["kind"] == "masked-diffusion":
        return "--kind masked-diffusion"
    flags = [f"--gamma {config['gamma']:g}" if config["gamma"] else "--gamma 0"]
    for key, flag in (("focal_lambda", "--focal-lambda"), ("chain_weight", "--chain-weight"),
                      ("align_fraction", "--align-fraction")):
        if config[key]:
            flags.append(f"{flag} {config[key]:g}")
    return " ".join(flags)


def table(bench: Path, records: Path) -> str:
    results = json.loads((bench / "results.json").read_text())
    temperatures = sorted(results["temperatures"], key=float)
    header = ["row", "decoder", "objective"]
    for t in temperatures:
        header += [f"tau T={t}", f"speedup T={t}"]
    header += ["sim tau (train end)", "held-out loss"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    decoders = [d for d in results["temperatures"][temperatures[0]]["decoders"] if d.startswith("abl-")]
    for decoder in decoders:
        label = decoder.removeprefix("abl-").split("@")[0]  # e.g. masked:steps=2:warmup=8
        trained = json.loads((records / f"{label.split(':')[0]}.drafter.json").read_text())["training"]
        cells = [label, f"`{decoder}`", f"`{objective(trained['config'])}`"]
        for t in temperatures:
            figures = results["temperatures"][t]["figures"]["all"][decoder]
            cells += [f"{figures['tau']:.2f}", f"{figures['speedup']['median_time']:.2f}x"]
        final = trained["final"]
        cells += [f"{final['sim_tau']:.2f}", f"{final['eval_loss']:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__.strip().splitlines()[-1].strip())
    print(table(Path(sys.argv[1]), Path(sys.argv[2])))
