"""The training objective of a run: which loss pieces are on, and the two-stage schedule.

Composable (docs/design.md, 'Training drafters'): cross-entropy over the masked slots, weighted per slot
by positional weights (gamma; None = uniform) times first-error focal weights (lambda),
plus chain_weight x the chain loss, plus distill_weight x the KL of the target's full next-token
law from the drafter's at each scored slot (the soft labels, beside the hard ones). The two-stage alignment runs the last `align_fraction`
of the steps as stage II: each block keeps only its first R ~ U(1, min(align_max_masked,
g-1)) slots as targets (the rest of the block stays masked but unscored), weighted
alpha^(R-i), so the slots next to the known prefix matter most; stage I (every other
step) is the plain objective: the prefix before the anchor known, the whole suffix masked.
Knows nothing of models: logits and labels in, a scalar out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdraft.train.losses import (
    alignment_weights,
    chain_loss,
    distillation_loss,
    first_error_weights,
    positional_weights,
    weighted_block_loss,
)
from diffdraft.train.masks import IGNORE


@dataclass(frozen=True)
class Objective:
    gamma: float | None = 7.0
    focal_lambda: float = 0.0
    chain_weight: float = 0.0
    align_fraction: float = 0.0
    align_alpha: float = 1.01
    align_max_masked: int = 96
    distill_weight: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> "Objective":
        return cls(cfg.gamma, cfg.focal_lambda, cfg.chain_weight, cfg.align_fraction, cfg.align_alpha,
                   cfg.align_max_masked, getattr(cfg, "distill_weight", 0.0))

    def stage(self, step: int, total_steps: int) -> int:
        """1 or 2: the last align_fraction of the steps are stage II."""
        return 2 if self.align_fraction > 0 and step >= round(total_steps * (1 - self.align_fraction)) else 1

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, stage: int = 1,
             generator: torch.Generator | None = None, teacher: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B, nb, g-1, V], labels [B, nb, g-1], teacher (the target's logits for the same slots,
        needed when distill_weight > 0) [B, nb, g-1, V] -> scalar loss."""
        n = labels.shape[-1]
        if stage == 2:
            masked = torch.randint(1, min(self.align_max_masked, n) + 1, labels.shape[:-1], generator=generator)
            weights = alignment_weights(n, masked.to(labels.device), self.align_alpha)  # [B, nb, g-1]
            labels = labels.masked_fill(weights == 0, IGNORE)
        else:
            weights = positional_weights(n, self.gamma).to(labels.device)  # [g-1]
        if self.focal_lambda:
            weights = weights * first_error_weights(logits, labels, self.focal_lambda)
        loss = weighted_block_loss(logits, labels, weights)
        if self.chain_weight:
            loss = loss + self.chain_weight * chain_loss(logits, labels)
        if self.distill_weight:
            if teacher is None:
                raise ValueError("distillation needs the target's logits for the scored slots")
            loss = loss + self.distill_weight * distillation_loss(logits, teacher, labels, weights)
        return loss
