"""The HF backend: any Hugging Face causal LM behind the target interface, through its own
forward and a DynamicCache. The fallback for architectures the lean runtime does not know.
Its k-token logits are close to, not bit-identical with, k one-token forwards (`F.linear`
and SDPA round differently for different row counts), so greedy equality with plain
decoding is observed, not guaranteed, on this path.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache

from diffdraft.target import TargetBackend, TargetOutput, TargetState


class HFTarget(TargetBackend):
    """Incremental decoding over one HF causal LM; each sequence's cache is a crop-able DynamicCache."""

    kind = "hf"

    def _empty_cache(self, old, capacity: int) -> DynamicCache:  # grows as it fills: capacity is a bound only
        return DynamicCache(config=self.module.config)

    @torch.inference_mode()
    def _run(self, state: TargetState, ids: torch.Tensor, want_taps: bool, last_only: bool) -> TargetOutput:
        self._check_room(state, ids.shape[1])
        out = self.module(
            input_ids=ids.to(self.device),
            past_key_values=state.cache,
            use_cache=True,
            output_hidden_states=want_taps,
            logits_to_keep=1 if last_only else 0,
        )
        state.length += ids.shape[1]
        taps = torch.cat([out.hidden_states[i] for i in self.tap_layers], dim=-1) if want_taps else None
        return TargetOutput(logits=out.logits, taps=taps)

    def _crop_cache(self, state: TargetState, n: int) -> None:
        state.cache.crop(n - state.length)  # negative: drop that many from the end
