"""The dLLM quality figures of bench/quality.py on a tiny Llama and hand-made records."""

from __future__ import annotations

import math

import pytest
import torch

from diffdraft.bench.decoders import PLAIN
from diffdraft.bench.quality import answer_nll, common_prefix, dllm_quality, quality_markdown

PROMPTS = {"a": [5, 9, 33], "b": [7, 7, 100, 2]}


def token_by_token_nll(model, prompt: list[int], answer: list[int]) -> float:
    """The same sum, one forward per answer token (no shared forward to get wrong)."""
    total = 0.0
    for i, token in enumerate(answer):
        logits = model(input_ids=torch.tensor([prompt + answer[:i]])).logits[0, -1]
        total -= float(logits.log_softmax(dim=-1)[token])
    return total


def record(temperature: float, prompt: str, decoder: str, kind: str, tokens: list[int]) -> dict:
    return {"temperature": temperature, "prompt_id": prompt, "decoder": decoder, "kind": kind,
            "runs": [{"tokens": tokens}]}


def test_answer_nll_is_the_sum_of_per_token_losses(tiny_model):
    with torch.no_grad():
        expected = token_by_token_nll(tiny_model, [5, 9, 33], [40, 41, 42, 43])
    assert answer_nll(tiny_model, [5, 9, 33], [40, 41, 42, 43]) == pytest.approx(expected, rel=1e-5)
    assert answer_nll(tiny_model, [5, 9, 33], []) == 0.0


def test_common_prefix():
    assert common_prefix([1, 2, 3], [1, 2, 4, 5]) == 2 and common_prefix([], [1]) == 0 and common_prefix([3], [3]) == 1


def test_quality_pools_tokens_and_counts_equal_answers(tiny_model):
    answers = {("a", PLAIN): [40, 41, 42], ("a", "dllm-b4"): [40, 41, 42], ("a", "simsd-b4"): [40, 41, 42],
               ("b", PLAIN): [10, 11, 12, 13], ("b", "dllm-b4"): [10, 99]}
    kinds = {PLAIN: "engine", "dllm-b4": "dllm", "simsd-b4": "dllm"}
    records = [record(t, p, d, kinds[d], tokens) for t in (0.0, 1.0) for (p, d), tokens in answers.items()]
    decoders = {PLAIN: {"kind": "engine"}, "dllm-b4": {"kind": "dllm", "drafter_layers": None},
                "simsd-b4": {"kind": "dllm", "drafter_layers": 4}}
    quality = dllm_quality(tiny_model, records, decoders, PROMPTS.__getitem__)
    assert set(quality) == {"0", "1"} and set(quality["0"]) == {PLAIN, "dllm-b4"}
    row = quality["0"]["dllm-b4"]
    assert row["prompts"] == 2 and row["tokens"] == 5
    assert row["equal_to_ar"] == 1 and row["mean_common_prefix"] == 2.0  # (3 + 1) / 2
    with torch.no_grad():
        nll = token_by_token_nll(tiny_model, PROMPTS["a"], [40, 41, 42]) + token_by_token_nll(tiny_model, PROMPTS["b"],
                                                                                              [10, 99])
    assert row["ar_perplexity"] == pytest.approx(math.exp(nll / 5), rel=1e-3)
    assert quality["0"][PLAIN]["tokens"] == 7 and "equal_to_ar" not in quality["0"][PLAIN]
    assert "equal_to_ar" not in quality["1"]["dllm-b4"]  # a sampled answer is not expected to match
    lines = quality_markdown(quality)
    assert "| 0 | dllm-b4 | 2 | 5 |" in "\n".join(lines) and "| 1/2 | 2.0 |" in "\n".join(lines)


def test_no_dllm_no_quality(tiny_model):
    records = [record(0.0, "a", PLAIN, "engine", [1, 2])]
    assert dllm_quality(tiny_model, records, {PLAIN: {"kind": "engine"}}, PROMPTS.__getitem__) == {}
    assert quality_markdown({}) == []
