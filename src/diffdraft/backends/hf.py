"""The HF backend: any Hugging Face causal LM behind the target interface, through its own
forward and a DynamicCache. The fallback for architectures the lean runtime does not know.
Its k-token logits are close to, not bit-identical with, k one-token forwards (`F.linear`
and SDPA round differently for different row counts), so greedy equality with plain
decoding is observed, not guaranteed, on this path.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import DynamicCache

from diffdraft.target import TargetBackend, TargetOutput


class HFTarget(TargetBackend):
    """Incremental decoding over one HF causal LM with a crop-able KV cache."""

    kind = "hf"

    def __init__(self, module: nn.Module, tokenizer, tap_layers: tuple[int, ...] | None = None, name: str = "model"):
        super().__init__(module, tokenizer, tap_layers, name)
        self._cache: DynamicCache | None = None

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, want_taps: bool = False) -> TargetOutput:
        self._cache = DynamicCache(config=self.module.config)
        self._length = 0
        return self._run(ids, want_taps, logits_to_keep=1)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, want_taps: bool = False) -> TargetOutput:
        if self._cache is None:
            raise RuntimeError("call prefill() before forward()")
        return self._run(ids, want_taps, logits_to_keep=0)

    def _run(self, ids: torch.Tensor, want_taps: bool, logits_to_keep: int) -> TargetOutput:
        self._check_room(ids.shape[1])
        out = self.module(
            input_ids=ids.to(self.device),
            past_key_values=self._cache,
            use_cache=True,
            output_hidden_states=want_taps,
            logits_to_keep=logits_to_keep,
        )
        self._length += ids.shape[1]
        taps = torch.cat([out.hidden_states[i] for i in self.tap_layers], dim=-1) if want_taps else None
        return TargetOutput(logits=out.logits, taps=taps)

    def crop(self, n: int) -> None:
        self._check_crop(n)
        if n < self._length:
            self._cache.crop(n - self._length)  # negative: drop that many from the end
            self._length = n
