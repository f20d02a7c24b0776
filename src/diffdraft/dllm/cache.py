"""The KV cache of finished tokens: per layer, keys and values of every committed token.

A forward of the block-diffusion model returns the keys/values of all its new tokens; the
caller decides which of them become permanent (a prompt, a finished block) and appends
exactly those. Tokens still being denoised never enter the cache. Batch size 1 in
decoding; tensors keep their batch dimension. Knows nothing about models or masks.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys/values [B, Hkv, C, hd] per layer, growing by appends only."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    @property
    def length(self) -> int:
        """C, the number of cached tokens."""
        return self.keys[0].shape[2] if self.keys else 0

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        return (self.keys[index], self.values[index]) if self.keys else None

    def append(self, new_kv: list[tuple[torch.Tensor, torch.Tensor]], columns: torch.Tensor | slice) -> None:
        """Append the new tokens at `columns` (indices into a forward's new tokens) of every layer."""
        picked = [(k[:, :, columns], v[:, :, columns]) for k, v in new_kv]
        if not self.keys:
            self.keys = [k.contiguous() for k, _ in picked]
            self.values = [v.contiguous() for _, v in picked]
            return
        self.keys = [torch.cat([old, k], dim=2) for old, (k, _) in zip(self.keys, picked)]
        self.values = [torch.cat([old, v], dim=2) for old, (_, v) in zip(self.values, picked)]
