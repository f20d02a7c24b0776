"""Where a dLLM sequence's forwards run: the BlockDiffusionLM module, or the lean runtime's row forward.

A Session (decode.py) asks one sequence's runtime for three things: prefill the prompt
(causal) and give the last position's logits; run new tokens (MASK_ID allowed) at given
positions under a segment mask over [cache | new] (masks.py: every new token sees the
whole cache) and give every new row's logits; keep some rows of that forward in the cache
(ascending) and drop the rest. Two runtimes do this for one model (`blocks_for`):

- ModuleBlocks: the BlockDiffusionLM module as trained: the HF weights through `F.linear`,
  the LoRA adapters beside them, a growing KVCache. What training and the tests of the
  model itself use.
- LeanBlocks: the lean runtime (backends/lean.py) over the same model: the base weights as
  the AR target runs them (a GGUF model's own 4-bit blocks, else float32), each adapter's
  low-rank update beside its weight (not merged: rounding W + BA to 4 bits would erase most
  of the update), and the mask embedding as one more row of the embedding table, so a masked
  slot is token id V. A forward is rows with the visibility the mask gives them
  (docs/design.md, 'The row forward'): Rows with a depth from the positions and, per row,
  the new rows it sees; the cache is the runtime's own static one, and keeping rows is
  commit_path. Its logits equal the module's up to rounding on float32 weights (tested).

A Blocks object holds weights only and is shared by every request; `sequence()` makes one
request's state. Knows nothing of blocks being denoised, drafting or verification.
"""

from __future__ import annotations

import sys
from abc import ABC, abstractmethod

import torch

from diffdraft.dllm.cache import KVCache
from diffdraft.dllm.lora import PROJECTIONS
from diffdraft.dllm.masks import causal_mask
from diffdraft.dllm.model import MASK_ID, BlockDiffusionLM
from diffdraft.errors import DiffdraftError
from diffdraft.target import Rows

RUNTIMES = ("module", "lean")


class Sequence(ABC):
    """One sequence's cache and forwards on a runtime (see the module docstring)."""

    forwards: int = 0

    @property
    @abstractmethod
    def length(self) -> int:
        """Tokens in the cache."""

    @abstractmethod
    def prefill(self, prompt: list[int]) -> torch.Tensor:
        """Start the sequence with the prompt (causal) -> the last position's logits [V] float32."""

    @abstractmethod
    def run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """ids, positions [1, T]; mask [1, 1, T, C+T] -> logits of every new row [T, V] float32."""

    @abstractmethod
    def keep(self, rows: list[int]) -> None:
        """Cache rows (ascending) of the last run, in that order after the cache; drop the others."""


class ModuleSequence(Sequence):
    def __init__(self, net: BlockDiffusionLM):
        self.net = net
        self.cache = KVCache()
        self._new_kv: list | None = None  # the last run's keys/values, until keep()

    @property
    def length(self) -> int:
        return self.cache.length

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> torch.Tensor:
        hidden, kv = self.net(torch.tensor([prompt]), torch.arange(len(prompt))[None], causal_mask(0, len(prompt)))
        self.cache = KVCache()
        self.cache.append(kv, slice(0, len(prompt)))
        return self.net.logits(hidden[0, -1]).float()

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        hidden, self._new_kv = self.net(ids, positions, mask, self.cache)  # [1, T, D]
        self.forwards += 1
        return self.net.logits(hidden[0]).float()

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        if rows:
            self.cache.append(self._new_kv, torch.tensor(rows))
        self._new_kv = None


class LeanSequence(Sequence):
    def __init__(self, blocks: "LeanBlocks"):
        self.target = blocks.target
        self.mask_id = blocks.mask_id
        self.state = self.target.new_state()
        self._start: int | None = None  # where the last run's rows begin, until keep()

    @property
    def length(self) -> int:
        return self.state.length

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> torch.Tensor:
        return self.target.prefill(self.state, torch.tensor([prompt])).logits[0, -1].float()

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        start = self.state.length
        new = mask[0, 0, :, start:]  # [T, T] which new rows each sees
        if not bool(mask[0, 0, :, :start].all()):
            raise ValueError("the lean runtime's rows see the whole cache; this mask hides part of it")
        rows = Rows(depth=tuple(int(p) - start for p in positions[0]),
                    sees=tuple(tuple(torch.nonzero(row).flatten().tolist()) for row in new))
        tokens = torch.where(ids[0] == MASK_ID, self.mask_id, ids[0])  # [T]
        logits = self.target.forward(self.state, tokens[None], rows=rows).logits[0]  # [T, V]
        self._start = start
        self.forwards += 1
        return logits.float()

    @torch.inference_mode()
    def keep(self, rows: list[int]) -> None:
        self.target.commit_path(self.state, self._start, rows)
        self._start = None


class ModuleBlocks:
    """The module runtime (see the module docstring)."""

    kind = "module"

    def __init__(self, net: BlockDiffusionLM):
        self.net = net
        self.weights = str(next(net.base.parameters()).dtype).removeprefix("torch.")  # as loaded

    def sequence(self) -> ModuleSequence:
        return ModuleSequence(self.net)


class LeanBlocks:
    """The lean runtime over `net` (see the module docstring): the base model's weights as the AR target
    would run them (native 4-bit blocks for a GGUF model, `gguf`; float32 otherwise), each LoRA adapter
    beside its weight, the mask embedding as embedding row V. `tokenizer` is the target's. Refuses, in one
    line, a model the lean runtime cannot run and a net shallower than its base (a drafter)."""

    kind = "lean"

    def __init__(self, net: BlockDiffusionLM, tokenizer, gguf=None, report=None):
        from diffdraft.backends import LeanLlamaTarget, int4_layers, lean_unsupported, resolve_weights

        module = net.base
        reason = lean_unsupported(module)
        if reason:
            raise DiffdraftError(f"the lean runtime cannot run this dLLM: {reason}; use --backend hf")
        depth = module.config.num_hidden_layers
        if net.num_layers != depth:
            raise DiffdraftError(f"the lean runtime runs a dLLM of its base model's {depth} layers, not {net.num_layers}")
        self.net = net
        self.weights = resolve_weights("auto", "lean", module, gguf)  # native, or float32
        int4 = None
        if self.weights != "float32":
            int4, told = int4_layers(module, self.weights, gguf)
            (report or _to_stderr)(f"dLLM {told}; LoRA adapters beside the weights")
        adapters = [{name: update for name in PROJECTIONS if (update := net.adapters.factors(index, name)) is not None}
                    for index in range(depth)]
        self.mask_id = net.vocab_size  # the embedding's extra row
        self.target = LeanLlamaTarget(module, tokenizer, tap_layers=(), name="dllm", int4_layers=int4,
                                      weights=self.weights, low_rank=adapters,
                                      extra_embeddings=net.mask_embedding[None])

    def sequence(self) -> LeanSequence:
        return LeanSequence(self)


Blocks = ModuleBlocks | LeanBlocks


def blocks_for(net: BlockDiffusionLM, runtime: str, tokenizer=None, gguf=None) -> Blocks:
    """The runtime `runtime` (module or lean) over `net` (`gguf`: the file the base model came from)."""
    if runtime == "module":
        return ModuleBlocks(net)
    if runtime == "lean":
        return LeanBlocks(net, tokenizer, gguf)
    raise DiffdraftError(f"dLLM runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)
