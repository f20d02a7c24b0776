"""Blockwise decoding with a block-diffusion model: the session state and the plain decoder.

A Session holds one sequence on a runtime (runtime.py: the module or the lean runtime): the
KV cache of the prompt and of every finished block that has been run through the model,
the logits of the last cached position (they predict the next block's slot 0, see
model.slot_hidden), plus the finished blocks not yet run (they ride along, as a prefix,
with the next forward and are cached there). A BlockState is the
block being denoised. `decode` is the model's own decoding, the baseline: prefill the
prompt causally, then for each block of b slots run `steps` forwards, each revealing
schedule(b, steps)[j] slots by the rule of unmask.py; a block is finished when no slot
is masked; generation stops after the block that holds an end token or reaches
max_new_tokens, and the output is cut after the first end token and at max_new_tokens.
It knows nothing of drafting or verification (simsd.py builds on the Session).
"""

from __future__ import annotations

import time
from typing import Callable
from dataclasses import dataclass, field

import torch

from diffdraft.config import SamplingConfig
from diffdraft.dllm.masks import finished_then
from diffdraft.dllm.model import MASK_ID, BlockDiffusionLM
from diffdraft.dllm.runtime import Blocks, ModuleBlocks
from diffdraft.dllm.unmask import Step, choose_step, masked_slots, schedule
from diffdraft.errors import DiffdraftError


@dataclass(frozen=True)
class BlockState:
    """The block being denoised: slot 0 sits at position `start`; `step` steps are done."""

    start: int
    ids: tuple[int, ...]  # [b], MASK_ID where still masked
    step: int = 0

    @staticmethod
    def empty(start: int, block_size: int) -> "BlockState":
        return BlockState(start=start, ids=(MASK_ID,) * block_size)

    @property
    def finished(self) -> bool:
        return MASK_ID not in self.ids

    def advance(self, step: Step) -> "BlockState":
        return BlockState(start=self.start, ids=tuple(step.apply(list(self.ids))), step=self.step + 1)

    def next_block(self) -> "BlockState":
        return BlockState.empty(self.start + len(self.ids), len(self.ids))


class Session:
    """One sequence decoded blockwise by one block-diffusion model (batch size 1), on a runtime (runtime.py:
    the module, or the lean runtime's row forward)."""

    def __init__(self, model: BlockDiffusionLM | Blocks):
        self.blocks = ModuleBlocks(model) if isinstance(model, BlockDiffusionLM) else model
        self.net = self.blocks.net
        self.sequence = self.blocks.sequence()
        self.unsent: list[tuple[int, ...]] = []  # finished blocks not yet in the cache
        self.before: torch.Tensor | None = None  # [V] logits of the last cached position: they predict slot 0
        self._kept: list[int] = []  # rows of the last forward to cache before the next one
        self._ran = False  # a forward ran whose rows are not yet kept or dropped

    @property
    def forwards(self) -> int:
        """Forwards after the prefill."""
        return self.sequence.forwards

    @property
    def length(self) -> int:
        """Tokens in the cache (the rows kept from the last forward included)."""
        self._commit()
        return self.sequence.length

    @torch.inference_mode()
    def begin(self, prompt: list[int], max_new_tokens: int) -> BlockState:
        """Prefill the prompt (causal) and return the first, all-masked block."""
        b = self.net.block_size
        if not prompt:
            raise DiffdraftError("the prompt is empty")
        if max_new_tokens < 1:
            raise DiffdraftError(f"max-new-tokens must be positive, got {max_new_tokens}")
        limit = getattr(self.net.base.config, "max_position_embeddings", None) or 2048
        needed = len(prompt) + (-(-max_new_tokens // b) + 1) * b
        if needed > limit:
            raise DiffdraftError(f"prompt plus {max_new_tokens} new tokens in blocks of {b} exceed the context of {limit}")
        self.before = self.sequence.prefill(prompt)
        self.unsent, self._kept, self._ran = [], [], False
        return BlockState.empty(len(prompt), b)

    def finish(self, ids: tuple[int, ...]) -> None:
        """A block is final: it will be cached by the next forward."""
        self.unsent.append(tuple(ids))

    def keep(self, logits: torch.Tensor, rows: slice) -> None:
        """Cache `rows` of the last forward too (clean tokens that extend the context, after the finished
        blocks it carried); logits [T, V] of that forward: its last kept row's become `before`."""
        self._kept += list(range(rows.start, rows.stop))
        self.before = logits[rows.stop - 1]

    def _commit(self) -> None:
        """Keep the chosen rows of the last forward and drop the rest, once, before the cache is read."""
        if self._ran:
            self.sequence.keep(self._kept)
            self._kept, self._ran = [], False

    @torch.inference_mode()
    def run(self, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """One forward over [unsent finished blocks | more]; the unsent blocks are cached.

        ids, positions: [1, T]; mask: [1, 1, T, C+T]. Returns the logits of every row [T, V]."""
        self._commit()
        logits = self.sequence.run(ids, positions, mask)  # [T, V]
        self._ran = True
        sent = len(self.unsent) * self.net.block_size
        if sent:
            self.keep(logits, slice(0, sent))
            self.unsent = []
        return logits

    def block_logits(self, block: BlockState) -> torch.Tensor:
        """Logits for every slot of the block in its current state, [b, V] (one forward)."""
        b = self.net.block_size
        n = len(self.unsent)
        ids = [t for blk in self.unsent for t in blk] + list(block.ids)
        positions = torch.arange(block.start - n * b, block.start + b)[None]
        logits = self.run(torch.tensor([ids]), positions, finished_then(self.length, n, b, [b]))
        return self.net.slot_hidden(self.before, logits[n * b :])


@dataclass
class DLLMResult:
    """The output of one generation and what it cost."""

    tokens: list[int]
    forwards: int  # target forwards after the prefill
    seconds: float
    revealed: list[int] = field(default_factory=list)  # per target forward: slots it revealed (kept or not)
    first_block_s: float = 0.0  # time to the first finished block (the dLLM's time to first token)
    accepted: list[int] = field(default_factory=list)  # SimSD: drafted steps accepted per verification
    drafted: list[int] = field(default_factory=list)  # SimSD: steps drafted per verification
    draft_forwards: int = 0
    stopped: str | None = None  # the reason should_stop gave, when it ended the generation

    @property
    def tokens_per_forward(self) -> float:
        return len(self.tokens) / max(1, self.forwards)


class Output:
    """Finished blocks in order, and when to stop.

    on_tokens receives each finished block's tokens as the answer keeps them (cut after an end
    token and at max_new_tokens); should_stop, asked after each block, ends the generation when
    it returns a reason (kept in `stopped`)."""

    def __init__(self, max_new_tokens: int, eos_ids: frozenset[int],
                 on_tokens: Callable[[list[int]], None] | None = None,
                 should_stop: Callable[[], str | None] | None = None):
        self.blocks: list[tuple[int, ...]] = []
        self.max_new_tokens = max_new_tokens
        self.eos_ids = eos_ids
        self.first_at: float | None = None  # perf_counter() when the first block was finished
        self.on_tokens, self.should_stop = on_tokens, should_stop
        self.sent = 0  # tokens handed to on_tokens so far
        self.stopped: str | None = None

    def add(self, ids: tuple[int, ...]) -> bool:
        """Append a finished block; True when generation is done."""
        if self.first_at is None:
            self.first_at = time.perf_counter()
        self.blocks.append(tuple(ids))
        done = any(t in self.eos_ids for t in ids) or len(self.blocks) * len(ids) >= self.max_new_tokens
        if self.on_tokens is not None:
            kept = self.tokens()
            self.on_tokens(kept[self.sent:])
            self.sent = len(kept)
        if not done and self.should_stop is not None:
            self.stopped = self.should_stop()
            done = self.stopped is not None
        return done

    def tokens(self) -> list[int]:
        """All finished tokens, cut after the first end token and at max_new_tokens."""
        out: list[int] = []
        for token in (t for block in self.blocks for t in block):
            out.append(token)
            if token in self.eos_ids:
                break
        return out[: self.max_new_tokens]


def settle(block: BlockState, session: Session, output: Output) -> BlockState | None:
    """After a step: a finished block goes to the output and (by the next forward) to the cache,
    and the next block begins. None when generation is done."""
    if not block.finished:
        return block
    if output.add(block.ids):
        return None
    session.finish(block.ids)
    return block.next_block()


def decode(
    net: BlockDiffusionLM | Blocks,
    prompt: list[int],
    steps: int,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    eos_ids: frozenset[int] = frozenset(),
    on_tokens: Callable[[list[int]], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
) -> DLLMResult:
    """The model's own blockwise decoding (see the module docstring); on_tokens and should_stop as
    in Output."""
    sampling = sampling or SamplingConfig()
    session = Session(net)
    counts = schedule(session.net.block_size, steps)
    start = time.perf_counter()
    block = session.begin(prompt, max_new_tokens)
    output = Output(max_new_tokens, eos_ids, on_tokens, should_stop)
    revealed = []
    while True:
        logits = session.block_logits(block)  # [b, V]
        step = choose_step(logits, masked_slots(list(block.ids)), counts[block.step], sampling, generator)
        revealed.append(len(step.slots))
        block = settle(block.advance(step), session, output)
        if block is None:
            break
    return DLLMResult(tokens=output.tokens(), forwards=session.forwards, seconds=time.perf_counter() - start,
                      revealed=revealed, first_block_s=output.first_at - start, stopped=output.stopped)
