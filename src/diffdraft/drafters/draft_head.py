"""The drafters' output head: the target's frozen LM head, optionally over a reduced vocabulary.

A reduced draft vocabulary (the most frequent tokens of the training data, stored with the
drafter as target ids) cuts the head's cost: logits are computed only for those rows of
the target's head. The returned q is put back into the full vocabulary with zeros
elsewhere, so it stays the exact law of the drafted token and the verifier always works
in the full vocabulary. Knows nothing of the drafter network that produced the hidden states.
"""

from __future__ import annotations

import torch

from diffdraft.config import SamplingConfig
from diffdraft.drafters.base import Drafter
from diffdraft.backends.kernels import prepared_linear
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_probs

DRAFT_VOCAB_KEY = "draft_vocab"  # tensor name of the id map inside a drafter checkpoint


class DraftHead:
    def __init__(self, target, draft_vocab: torch.Tensor | None = None, four_bit: bool = False):
        """four_bit: read the head's rows as 4-bit groups (rounded to nearest), for a drafter whose layers run
        on 4-bit weights; else float16 where the target's own head is, else the target's dtype."""
        self.target = target
        self.draft_vocab = None
        self._weight = None
        if draft_vocab is not None:
            if draft_vocab.dim() != 1 or draft_vocab.numel() == 0 or int(draft_vocab.max()) >= target.vocab_size \
                    or int(draft_vocab.min()) < 0:
                raise DiffdraftError("the drafter's draft vocabulary holds ids outside the target vocabulary")
            self.draft_vocab = draft_vocab.long().to(target.device)
        weight, bias = target.lm_head.weight, target.lm_head.bias
        if self.draft_vocab is not None:
            weight, bias = weight[self.draft_vocab], None if bias is None else bias[self.draft_vocab]
        # [N, D], prepared once for the fastest kernel: float16 weights where the target's own head has them
        self._weight = prepared_linear(weight, bias, half=target.half_head, four_bit=four_bit)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, D] -> logits [n, N] over the draft vocabulary (N = V without one)."""
        return self._weight(hidden.to(self.target.dtype))

    def to_target_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Draft-vocabulary indices -> target token ids."""
        return ids if self.draft_vocab is None else self.draft_vocab[ids]

    def to_full(self, probs: torch.Tensor) -> torch.Tensor:
        """[n, N] probabilities over the draft vocabulary -> [n, V] with zeros outside it."""
        if self.draft_vocab is None:
            return probs
        full = torch.zeros(probs.shape[0], self.target.vocab_size, device=probs.device)
        full[:, self.draft_vocab] = probs
        return full

    def probs(self, hidden: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
        """hidden [n, D] -> q [n, V] float32 in the full target vocabulary."""
        return self.to_full(logits_to_probs(self.logits(hidden), sampling))


def add_draft_vocab(config: dict, tensors: dict, draft_vocab: torch.Tensor | None) -> None:
    """Store a draft vocabulary (if any) with a checkpoint's tensors and note its size in the config."""
    if draft_vocab is not None:
        tensors[DRAFT_VOCAB_KEY] = draft_vocab.long()
        config["draft_vocab_size"] = int(draft_vocab.numel())


class HeadedDrafter(Drafter):
    """A drafter with its own network (`net`, whose cfg has block_size) and a DraftHead (`head`)."""

    @property
    def draft_vocab(self) -> torch.Tensor | None:
        """The target ids this drafter may propose, or None for the whole vocabulary."""
        return self.head.draft_vocab

    @property
    def block_size(self) -> int:
        return self.net.cfg.block_size
