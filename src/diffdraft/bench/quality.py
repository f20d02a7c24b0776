"""How close a converted dLLM's answers are to the AR model it came from.

A bench run with a dLLM holds, per temperature and prompt, plain decoding's answer (the AR
target) and the dLLM's own answer. Both are scored by the AR model: the negative
log-likelihood of every answer token given the chat prompt and the answer before it,
pooled over prompts into a perplexity (exp of the token-weighted mean). The AR model's
perplexity of its own answers is what a faithful conversion approaches; a dLLM that writes
text the AR model finds unlikely scores higher. At temperature 0 it also counts the
prompts where the dLLM's greedy answer equals the AR model's token for token, and the mean
number of leading tokens they share. SimSD is left out: its tokens are the dLLM's own.
Reads records (store.py) and runs the AR model; knows nothing of decoding.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from diffdraft.bench.decoders import PLAIN
from diffdraft.bench.metrics import first_difference, temperature_key


def answer_nll(model, prompt: list[int], answer: list[int]) -> float:
    """Summed negative log-likelihood of `answer` after `prompt` under a causal LM (one forward)."""
    if not answer:
        return 0.0
    ids = torch.tensor([prompt + answer], device=model.device)  # [1, P+A]
    with torch.inference_mode():
        logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()  # [A, V]
    return float(F.cross_entropy(logits, ids[0, len(prompt) :], reduction="sum"))


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens two answers share."""
    differs_at = first_difference(a, b)
    return len(a) if differs_at is None else differs_at


def dllm_quality(model, records: list[dict], decoders: dict[str, dict],
                 prompt_ids: Callable[[str], list[int]]) -> dict:
    """{temperature: {decoder: figures}} for plain decoding and every dLLM decoding without a drafter.

    records: the bench's (first run of each record is used); decoders: settings' descriptions
    (kind, drafter_layers); prompt_ids: prompt id -> the token ids the answers followed.
    """
    own = [d for d, info in decoders.items() if info.get("kind") == "dllm" and not info.get("drafter_layers")]
    if not own:
        return {}
    answers: dict[str, dict[str, dict[str, list[int]]]] = {}  # temperature -> prompt -> decoder -> tokens
    for r in records:
        if r["decoder"] in own or r["decoder"] == PLAIN:
            answers.setdefault(temperature_key(r["temperature"]), {}).setdefault(r["prompt_id"], {})[r["decoder"]] = \
                r["runs"][0]["tokens"]
    out: dict = {}
    for temperature, by_prompt in answers.items():
        complete = {p: a for p, a in by_prompt.items() if PLAIN in a and any(d in a for d in own)}
        figures = {}
        for d in [PLAIN, *own]:
            scored = {p: a for p, a in complete.items() if d in a}
            if not scored:
                continue
            nll = sum(answer_nll(model, prompt_ids(p), a[d]) for p, a in scored.items())
            tokens = sum(len(a[d]) for a in scored.values())
            row = {"prompts": len(scored), "tokens": tokens,
                   "ar_perplexity": round(math.exp(nll / tokens), 3) if tokens else None}
            if d != PLAIN and float(temperature) == 0.0:
                row["equal_to_ar"] = sum(a[d] == a[PLAIN] for a in scored.values())
                row["mean_common_prefix"] = round(
                    sum(common_prefix(a[d], a[PLAIN]) for a in scored.values()) / len(scored), 1)
            figures[d] = row
        out[temperature] = figures
    return out


def quality_markdown(quality: dict) -> list[str]:
    """The report's section for dllm_quality's figures (no lines when there are none)."""
    if not quality:
        return []
    lines = ["", "## dLLM quality against the AR model", "",
             "AR perplexity: exp of the mean negative log-likelihood per answer token under the AR target "
             "(SmolLM2 itself), given the chat prompt. Plain decoding's row is the AR model's own answers. At "
             "temperature 0: answers equal to the AR model's greedy answer, and mean leading tokens shared.", "",
             "| temperature | decoder | prompts | tokens | AR perplexity | equal to AR | mean common prefix |",
             "|---|---|---|---|---|---|---|"]
    for temperature, figures in quality.items():
        for d, f in figures.items():
            equal = f"{f['equal_to_ar']}/{f['prompts']}" if "equal_to_ar" in f else "-"
            prefix = f"{f['mean_common_prefix']}" if "mean_common_prefix" in f else "-"
            lines.append(f"| {temperature} | {d} | {f['prompts']} | {f['tokens']} | {f['ar_perplexity']} | "
                         f"{equal} | {prefix} |")
    return lines
