"""How far one set of weights drifts from another on the same model (4-bit against float32).

Three measures (docs/native-weights.md): where greedy answers first part ways (from a bench
run's temperature-0 records of two plain decoders), how often the two agree on the next token
along the same text (teacher forcing: the reference's greedy answer fed to both), and the
negative log-likelihood of held-out text under each. Knows nothing of decoders or drafting.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from diffdraft.bench.metrics import first_difference
from diffdraft.target import TargetBackend


@torch.inference_mode()
def next_token_logits(target: TargetBackend, prompt: list[int], text: list[int]) -> torch.Tensor:
    """Logits [len(text), V] float32 of each token of `text` given the prompt and the text before it."""
    state = target.new_state()
    first = target.prefill(state, torch.tensor([prompt])).logits[0]  # [1, V]
    if len(text) < 2:
        return first[: len(text)].float()
    rest = target.forward(state, torch.tensor([text[:-1]])).logits[0]  # [n - 1, V]
    return torch.cat([first, rest]).float()


@dataclass
class TextScore:
    tokens: int = 0
    nll: float = 0.0  # summed, nats
    agree: int = 0  # tokens where the argmax equals the other target's argmax

    @property
    def mean_nll(self) -> float:
        return self.nll / self.tokens if self.tokens else float("nan")


def compare_on_texts(reference: TargetBackend, other: TargetBackend,
                     items: list[tuple[list[int], list[int]]]) -> tuple[TextScore, TextScore]:
    """Both targets on the same (prompt, text) pairs: each one's NLL of the text, and (counted on `other`)
    how often its next-token argmax equals the reference's."""
    ref_score, other_score = TextScore(), TextScore()
    for prompt, text in items:
        if not text:
            continue
        target_ids = torch.tensor(text)
        a, b = next_token_logits(reference, prompt, text), next_token_logits(other, prompt, text)
        for score, logits in ((ref_score, a), (other_score, b)):
            score.tokens += len(text)
            score.nll -= logits.log_softmax(-1).gather(-1, target_ids[:, None]).sum().item()
        other_score.agree += int((a.argmax(-1) == b.argmax(-1)).sum())
        ref_score.agree += len(text)
    return ref_score, other_score


def divergence_summary(reference: dict[str, list[int]], other: dict[str, list[int]]) -> dict:
    """First position where two greedy answers differ, over the prompts both answered."""
    firsts = {pid: first_difference(reference[pid], other[pid]) for pid in reference if pid in other}
    parted = sorted(f for f in firsts.values() if f is not None)
    buckets = {"0-15": 0, "16-63": 0, "64-127": 0, "128+": 0}
    for f in parted:
        key = "0-15" if f < 16 else "16-63" if f < 64 else "64-127" if f < 128 else "128+"
        buckets[key] += 1
    return {"prompts": len(firsts), "identical": len(firsts) - len(parted),
            "first_divergence_median": statistics.median(parted) if parted else None,
            "first_divergence": buckets, "positions": parted}
