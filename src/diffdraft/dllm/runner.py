"""One configured way of decoding with a dLLM target: its own decoding, or SimSD with a drafter.

DLLMRunner fixes the target, the drafter (None: the target's own blockwise decoding, the
baseline), the steps per block and the verification mode, and answers token-id prompts
with a fresh seeded torch.Generator per run (on the CPU, as the engine's). `to_stats` turns
a DLLMResult into the diffdraft.stats.Stats that generate and bench report: one trace
entry per target forward after the prefill, with the tokens that forward revealed (cut
at the end of the answer, so tau = tokens per target forward), and for SimSD the
drafted and accepted steps (one slot per step when steps = block size). Knows nothing of
text, prompt suites or files.
"""

from __future__ import annotations

import threading
from typing import Callable

import torch

from diffdraft.config import SamplingConfig
from diffdraft.costs import context_ids
from diffdraft.dllm.budget import StepBudget, measure
from diffdraft.dllm.decode import BlockState, DLLMResult, decode
from diffdraft.dllm.drafter import DLLMDrafter
from diffdraft.dllm.model import BlockDiffusionLM
from diffdraft.dllm.runtime import Blocks, ModuleBlocks
from diffdraft.dllm.simsd import decode_simsd, resolve_mode
from diffdraft.dllm.unmask import schedule
from diffdraft.prompting import check_seed
from diffdraft.stats import Stats

class DLLMRunner:
    """A dLLM target, on a runtime (runtime.py; a bare BlockDiffusionLM runs on the module), with an
    optional drafter; run() answers one prompt."""

    def __init__(self, target: BlockDiffusionLM | Blocks, drafter: DLLMDrafter | None, steps: int | None = None,
                 eos_ids: frozenset[int] = frozenset(), verify: str = "auto", label: str = "dllm"):
        self.blocks = ModuleBlocks(target) if isinstance(target, BlockDiffusionLM) else target
        self.net = net = self.blocks.net
        self.drafter = drafter
        self.steps = net.block_size if steps is None else steps
        schedule(net.block_size, self.steps)  # validates the step count
        if drafter is not None:
            resolve_mode(verify, SamplingConfig(), net.block_size, self.steps)  # e.g. rejection needs steps = b
            drafter.check_compatible(net)
        self.eos_ids = eos_ids
        self.verify = verify
        self.budget: StepBudget | None = None  # SimSD's step budget on the lean runtime, measured on first use
        self._budget_lock = threading.Lock()
        self.label = label  # what the target is: "dllm" for a converted one, "dllm-base" for the untrained one

    @property
    def baseline_name(self) -> str:
        """The name of the target's own decoding with these blocks and steps (SimSD's reference)."""
        b = self.net.block_size
        return f"{self.label}-b{b}" + ("" if self.steps == b else f"-s{self.steps}")

    @property
    def name(self) -> str:
        if self.drafter is None:
            return self.baseline_name
        return "simsd" + self.baseline_name[len("dllm"):]

    @property
    def runtime(self) -> str:
        """Where the target's forwards run: module or lean."""
        return self.blocks.kind

    @property
    def draft_len(self) -> int:
        """Steps a SimSD verification can check at most (0 for the target's own decoding)."""
        return 0 if self.drafter is None else self.steps

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int,
            on_tokens: Callable[[list[int]], None] | None = None,
            should_stop: Callable[[], str | None] | None = None) -> DLLMResult:
        """One answer; on_tokens gets each finished block's tokens, should_stop is asked after each block."""
        generator = torch.Generator().manual_seed(check_seed(seed))  # on the CPU, as the engine's
        if self.drafter is None:
            return decode(self.blocks, prompt, self.steps, max_new_tokens, sampling, generator, self.eos_ids,
                          on_tokens=on_tokens, should_stop=should_stop)
        budget = self.step_budget() if self.blocks.kind == "lean" and sampling.greedy else None
        return decode_simsd(self.blocks, self.drafter, prompt, self.steps, max_new_tokens, sampling, generator,
                            self.eos_ids, mode=self.verify, on_tokens=on_tokens, should_stop=should_stop,
                            budget=budget)

    def step_budget(self) -> StepBudget:
        """SimSD's step budget (budget.py) over the lean runtime's target and this drafter, measured once, on
        first use: forwards over up to steps + 2 blocks of rows after the length rule's synthetic context
        (costs.context_ids), and one drafter step."""
        with self._budget_lock:
            if self.budget is None:
                b, target = self.net.block_size, self.blocks.target
                most = (self.steps + 2) * b
                ids = context_ids(target, most)  # [1, context + most]
                context = ids.shape[1] - most
                state = target.new_state()
                with torch.inference_mode():
                    target.prefill(state, ids[:, :context])

                def forward_rows(k: int) -> None:
                    target.forward(state, ids[:, context : context + k])
                    target.crop(state, context)

                draft_state = self.drafter.new_state()
                with torch.inference_mode():
                    self.drafter.begin(draft_state, ids[0, :context].tolist(), b)
                block, first = BlockState.empty(context, b), schedule(b, self.steps)[0]

                def draft_step() -> None:
                    self.drafter.propose(draft_state, [], block, [first], SamplingConfig(), False, None)

                with torch.inference_mode():
                    costs = measure(forward_rows, draft_step, b, most)
                self.budget = StepBudget(costs, b)  # its counts are updated in place later: not inference tensors
        return self.budget

    def stop_reason(self, result: DLLMResult) -> str:
        if result.stopped is not None:
            return result.stopped
        return "eos" if result.tokens and result.tokens[-1] in self.eos_ids else "length"

    def describe(self) -> str:
        drafter = "" if self.drafter is None else f", drafter of {self.drafter.net.num_layers} layers"
        return (f"{self.name}: blocks of {self.net.block_size}, {self.steps} steps per block, {self.runtime} "
                f"runtime{drafter}")


def cut_to(revealed: list[int], total: int) -> list[int]:
    """Per-forward counts with the tail cut so that they sum to `total` (forwards keep their entries)."""
    out, left = [], total
    for n in revealed:
        out.append(min(n, left))
        left -= out[-1]
    return out


def to_stats(result: DLLMResult, draft_len: int) -> Stats:
    """The Stats of one dLLM generation (see the module docstring)."""
    emitted = cut_to(result.revealed, len(result.tokens))  # [forwards]
    simsd = bool(result.drafted)
    return Stats(
        draft_len=draft_len,
        new_tokens=len(result.tokens),
        proposed=list(result.drafted) if simsd else [0] * len(emitted),
        accepted=list(result.accepted) if simsd else [0] * len(emitted),
        emitted=emitted,
        ttft_s=result.first_block_s,
        total_s=result.seconds,
    )


def summary(result: DLLMResult, stats: Stats) -> str:
    """One line: tokens, speed, tokens per target forward, and SimSD's acceptance."""
    line = (f"{stats.new_tokens} tokens in {stats.total_s:.2f} s ({stats.tokens_per_s:.1f} tok/s), "
            f"{stats.tau:.2f} tokens per target forward ({stats.steps} forwards), "
            f"first block {stats.ttft_s * 1000:.0f} ms")
    if result.drafted:
        line += (f", drafted steps accepted {sum(result.accepted)}/{sum(result.drafted)}, "
                 f"{result.draft_forwards} drafter forwards")
    return line
