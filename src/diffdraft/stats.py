"""Decoding statistics: tau, per-position acceptance, acceptance histogram, speed.

A trace is one record per target verify step: how many draft tokens were proposed and how
many were accepted, plus how many tokens the step emitted (accepted + the one target token,
less anything cut by EOS or the token limit). Pure arithmetic; knows nothing of models.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Stats:
    draft_len: int = 0  # g asked of the drafter
    new_tokens: int = 0  # tokens generated, the first (from prefill) included
    proposed: list[int] = field(default_factory=list)  # per verify step: draft tokens proposed
    accepted: list[int] = field(default_factory=list)  # per verify step: draft tokens accepted
    emitted: list[int] = field(default_factory=list)  # per verify step: tokens emitted
    ttft_s: float = 0.0  # time to first token (prefill + first sample)
    total_s: float = 0.0  # whole generation
    draft_s: float = 0.0  # time inside the drafter
    verify_s: float = 0.0  # time in target forwards of verify steps + verification
    runs: int = 1  # generations pooled into this record
    cost_curve: dict | None = None  # the measured costs the length rule used (draft_length.CostCurve.to_dict)

    def record_step(self, proposed: int, accepted: int, emitted: int) -> None:
        self.proposed.append(proposed)
        self.accepted.append(accepted)
        self.emitted.append(emitted)

    @property
    def steps(self) -> int:
        """Target forwards after the prefill."""
        return len(self.emitted)

    @property
    def tau(self) -> float:
        """Mean accepted length: tokens emitted per verify step, bonus/recovered token included."""
        return sum(self.emitted) / self.steps if self.steps else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.total_s if self.total_s > 0 else 0.0

    def histogram(self) -> list[int]:
        """counts[k] = verify steps that accepted exactly k draft tokens, k = 0..max proposed."""
        size = max([self.draft_len, *self.proposed]) + 1
        counts = [0] * size
        for k in self.accepted:
            counts[k] += 1
        return counts

    def length_histogram(self) -> list[int]:
        """counts[k] = verify steps that verified exactly k drafted tokens (the chosen lengths)."""
        counts = [0] * (max([self.draft_len, *self.proposed]) + 1)
        for k in self.proposed:
            counts[k] += 1
        return counts

    def per_position_acceptance(self) -> list[float]:
        """rate[i] = P(draft token i+1 accepted | it was proposed), for i = 0..g-1."""
        size = max([self.draft_len, *self.proposed], default=0)
        reached = [0] * size
        hits = [0] * size
        for proposed, accepted in zip(self.proposed, self.accepted):
            for i in range(proposed):
                reached[i] += 1
                hits[i] += i < accepted
        return [h / r if r else 0.0 for h, r in zip(hits, reached)]

    def merge(self, other: "Stats") -> "Stats":
        """Pool two runs (for suites of prompts): traces concatenate, times and counts add."""
        return Stats(
            draft_len=max(self.draft_len, other.draft_len),
            new_tokens=self.new_tokens + other.new_tokens,
            proposed=self.proposed + other.proposed,
            accepted=self.accepted + other.accepted,
            emitted=self.emitted + other.emitted,
            ttft_s=self.ttft_s + other.ttft_s,
            total_s=self.total_s + other.total_s,
            draft_s=self.draft_s + other.draft_s,
            verify_s=self.verify_s + other.verify_s,
            runs=self.runs + other.runs,
            cost_curve=self.cost_curve or other.cost_curve,
        )

    @property
    def mean_ttft_s(self) -> float:
        return self.ttft_s / self.runs if self.runs else 0.0

    def summary(self) -> str:
        return (
            f"{self.new_tokens} tokens in {self.total_s:.2f} s ({self.tokens_per_s:.1f} tok/s), "
            f"tau {self.tau:.2f} over {self.steps} steps, TTFT {self.mean_ttft_s * 1000:.0f} ms"
        )

    def to_dict(self) -> dict:
        return {
            "draft_len": self.draft_len,
            "new_tokens": self.new_tokens,
            "steps": self.steps,
            "tau": self.tau,
            "tokens_per_s": self.tokens_per_s,
            "runs": self.runs,
            "mean_ttft_s": self.mean_ttft_s,
            "total_s": self.total_s,
            "draft_s": self.draft_s,
            "verify_s": self.verify_s,
            "histogram": self.histogram(),
            "per_position_acceptance": self.per_position_acceptance(),
            "length_histogram": self.length_histogram(),
            "cost_curve": self.cost_curve,
        }
