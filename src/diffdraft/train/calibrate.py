"""Calibration of a block-diffusion drafter's q for sampling (temperature > 0).

Rejection sampling accepts slot k with probability alpha_k = sum_v min(p_k(v), q_k(v)), so
a q that is too sharp or too flat loses acceptance even when its argmax is right. The
drafter divides its logits by a scale s (greedy decoding is unchanged by it); calibration
measures, on held-out sequences, for each s on a grid, every slot's alpha against the
target's own law given the true prefix, and keeps the s with the largest mean expected
accepted length sum_k prod_{j<=k} alpha_j (the training-time approximation of tau - 1:
the prefix is the data's, not the drafted one). Lossless whatever s is: q stays the exact
law the drafter samples from. Uses the decode-time drafter itself (its head, its draft
vocabulary), so what is measured is what runs. Knows nothing of the trainer.
"""

from __future__ import annotations

import torch

from diffdraft.config import SamplingConfig
from diffdraft.drafters.block_diffusion import BlockDiffusionDrafter
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_probs

SCALES = tuple(2 ** (k / 4) for k in range(-8, 9))  # 0.25 .. 4, steps of 2^(1/4)


def expected_accepted(alpha: torch.Tensor) -> torch.Tensor:
    """alpha [..., g-1] per-slot acceptance -> [...] expected accepted draft tokens, sum_k prod_{j<=k}."""
    return alpha.cumprod(dim=-1).sum(dim=-1)


@torch.inference_mode()
def slot_evidence(drafter: BlockDiffusionDrafter, target, sequences, anchors_per_sequence: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """For random anchors a in the answers of `sequences`: the drafter's slot logits (before its q_scale) and
    the target's logits for the same slots given the true prefix. -> [n, g-1, N], [n, g-1, V]."""
    g = drafter.block_size
    sequence, context = target.new_state(), drafter.new_state()
    logits, laws = [], []
    for seq in sequences:
        low, high = max(seq.prompt_len, 1), len(seq.tokens) - g  # a full block of true continuation
        if high <= low:
            continue
        picks = torch.randint(low, high, (anchors_per_sequence,), generator=generator).tolist()
        for a in sorted(set(picks)):
            out = target.prefill(sequence, torch.tensor([seq.tokens[:a]]), want_taps=drafter.wants_taps)
            drafter.begin(context, seq.tokens[:a], out.taps)
            logits.append(drafter.slot_logits(context, seq.tokens[: a + 1], g - 1))  # [g-1, N]
            block = torch.tensor([seq.tokens[a : a + g - 1]])
            laws.append(target.forward(sequence, block).logits[0].float())  # [g-1, V]
    if not logits:
        raise DiffdraftError(f"no held-out answer is long enough for a block of {g}: calibration needs longer data")
    return torch.stack(logits), torch.stack(laws)


def acceptance_by_scale(drafter: BlockDiffusionDrafter, slot_logits: torch.Tensor, target_logits: torch.Tensor,
                        temperature: float = 1.0, scales=SCALES) -> dict[float, float]:
    """Mean expected accepted draft tokens per block for each scale, at this sampling temperature."""
    sampling = SamplingConfig(temperature=temperature)
    p = logits_to_probs(target_logits.flatten(0, 1), sampling)  # [n*(g-1), V]
    result = {}
    for s in scales:
        q = drafter.head.to_full(logits_to_probs(slot_logits.flatten(0, 1) / s, sampling))  # [n*(g-1), V]
        alpha = torch.minimum(p, q).sum(dim=-1).view(slot_logits.shape[:2])  # [n, g-1]
        result[s] = float(expected_accepted(alpha).mean())
    return result


def calibrate(drafter: BlockDiffusionDrafter, target, sequences, temperature: float = 1.0,
              anchors_per_sequence: int = 2, seed: int = 0) -> tuple[float, dict[float, float]]:
    """The best q scale for this drafter at `temperature`, and the measured curve (scale -> expected accepted)."""
    if not temperature > 0:
        raise DiffdraftError(f"calibration is for sampling: temperature must be > 0, got {temperature}")
    slots, laws = slot_evidence(drafter, target, sequences, anchors_per_sequence, torch.Generator().manual_seed(seed))
    curve = acceptance_by_scale(drafter, slots, laws, temperature)
    return max(curve, key=curve.get), curve
