"""The quality check of the native 4-bit weights against float32 (docs/native-weights.md).

Reads a bench folder run with `--weights native float32 --temperatures 0` (decoders `plain`
on native weights and `plain:float32`), then on SmolLM2:
  1. where the two greedy answers first part ways, per prompt;
  2. per-token agreement: float32's greedy answers fed to both, how often native's next-token
     argmax equals float32's;
  3. NLL of held-out text under both: AlpacaEval's reference answers (never used for training:
     `diffdraft data` excludes the benchmark suites), after their instruction in the chat template.
Writes DIR/drift.json and prints the figures; a measurement, not a test.

Usage: .venv/bin/python scripts/weights_drift.py --bench results/native-equality-256 [--texts 100]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from diffdraft.backends import build_target
from diffdraft.bench.drift import compare_on_texts, divergence_summary
from diffdraft.bench.store import RecordStore
from diffdraft.loading import default_gguf_path, load_model
from diffdraft.prompting import chat_ids
from diffdraft.suites import alpaca_eval_file, load_suite


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", required=True, help="bench folder with plain (native) and plain:float32 at T=0")
    parser.add_argument("--texts", type=int, default=100, help="AlpacaEval reference answers for the NLL")
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens of each held-out answer scored")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    started = time.time()

    module, tokenizer = load_model()
    native = build_target(module, tokenizer, backend="lean", weights="native", gguf=default_gguf_path())
    float32 = build_target(module, tokenizer, backend="lean", weights="float32")

    records = [r for r in RecordStore(args.bench).load() if float(r["temperature"]) == 0]
    answers = {name: {r["prompt_id"]: r["runs"][0]["tokens"] for r in records if r["decoder"] == name}
               for name in ("plain", "plain:float32")}
    if not answers["plain"] or not answers["plain:float32"]:
        raise SystemExit(f"{args.bench} has no temperature-0 records of both plain and plain:float32")
    divergence = divergence_summary(answers["plain:float32"], answers["plain"])

    suite = {p.id: p for p in load_suite("mt-bench")}
    greedy = [(chat_ids(float32, suite[pid].turns[0]), tokens) for pid, tokens in answers["plain:float32"].items()]
    _, on_greedy = compare_on_texts(float32, native, greedy)

    alpaca = json.loads(alpaca_eval_file().read_text())[: args.texts]
    held_out = [(chat_ids(float32, row["instruction"]),
                 tokenizer(row["output"], add_special_tokens=False)["input_ids"][: args.max_tokens])
                for row in alpaca]
    nll_float32, nll_native = compare_on_texts(float32, native, held_out)

    result = {
        "bench": args.bench,
        "greedy_divergence": divergence,
        "agreement_on_float32_greedy": {"tokens": on_greedy.tokens, "agree": on_greedy.agree,
                                        "rate": on_greedy.agree / on_greedy.tokens},
        "held_out_nll": {"texts": len(held_out), "tokens": nll_float32.tokens, "source": "AlpacaEval reference answers",
                         "float32": nll_float32.mean_nll, "native": nll_native.mean_nll,
                         "relative": nll_native.mean_nll / nll_float32.mean_nll - 1,
                         "argmax_agreement": nll_native.agree / nll_native.tokens},
        "threads": args.threads,
        "seconds": round(time.time() - started, 1),
    }
    (Path(args.bench) / "drift.json").write_text(json.dumps(result, indent=1) + "\n")
    d, h = divergence, result["held_out_nll"]
    print(f"greedy: {d['identical']}/{d['prompts']} identical over the whole answer; first divergence median "
          f"{d['first_divergence_median']}, buckets {d['first_divergence']}")
    print(f"per-token agreement on float32's greedy answers: {result['agreement_on_float32_greedy']['rate']:.4f} "
          f"of {on_greedy.tokens} tokens")
    print(f"held-out NLL ({h['texts']} texts, {h['tokens']} tokens): float32 {h['float32']:.4f}, native "
          f"{h['native']:.4f} nats/token ({100 * h['relative']:+.2f}%); argmax agreement {h['argmax_agreement']:.4f}")


if __name__ == "__main__":
    main()
