"""The dLLM drafter: a cheaper block-diffusion model proposing the rest of the current block.

It is a BlockDiffusionLM of its own (typically the first few layers of the converted
target, then the final norm and LM head, with adapters and a mask embedding of its own)
with its own Session: its own cache of the prompt and of the finished blocks the target
has produced. Asked for S steps, it runs S of its own denoising steps from the target's
current block state, by the same unmasking rule as the target (unmask.py), and returns
each step's slots and tokens, that is, every drafted token with the step at which it was
revealed. With `with_laws` (rejection sampling) each one-slot step is drawn from its exact
law step_law, which it returns as q. Its drafts never enter its cache: only blocks the
target has finished do. It knows nothing of the verifier.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdraft.config import SamplingConfig
from diffdraft.dllm.decode import BlockState, Session
from diffdraft.dllm.model import BlockDiffusionLM
from diffdraft.dllm.unmask import Step, choose_step, masked_slots, step_law
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import sample


@dataclass
class StepDraft:
    """S drafted steps and, for rejection sampling, the law q each was drawn from."""

    steps: list[Step]
    laws: torch.Tensor | None  # [S, b*V] float32: q_j given the steps before j; None if not stated


@dataclass
class DLLMDraftState:
    """The drafter's own view of one sequence."""

    session: Session  # its cache of the prompt and of the finished blocks
    seen: int = 0  # finished blocks handed to the session so far


class DLLMDrafter:
    """Drafts the current block's remaining steps with a small block-diffusion model."""

    def __init__(self, net: BlockDiffusionLM):
        self.net = net

    def check_compatible(self, target: BlockDiffusionLM) -> None:
        if self.net.block_size != target.block_size:
            raise DiffdraftError(f"drafter block size {self.net.block_size} != target block size {target.block_size}")
        if self.net.vocab_size != target.vocab_size:
            raise DiffdraftError(f"drafter vocabulary {self.net.vocab_size} != target vocabulary {target.vocab_size}")

    def new_state(self) -> DLLMDraftState:
        return DLLMDraftState(session=Session(self.net))

    def begin(self, state: DLLMDraftState, prompt: list[int], max_new_tokens: int) -> None:
        state.session.begin(prompt, max_new_tokens)
        state.seen = 0

    def propose(
        self,
        state: DLLMDraftState,
        finished: list[tuple[int, ...]],  # every block the target has finished so far, in order
        block: BlockState,
        counts: list[int],  # slots to reveal at each drafted step (len = S)
        sampling: SamplingConfig,
        with_laws: bool,
        generator: torch.Generator | None,
    ) -> StepDraft:
        for ids in finished[state.seen :]:
            state.session.finish(ids)
        state.seen = len(finished)
        steps, laws = [], []
        current = block
        for count in counts:
            logits = state.session.block_logits(current)  # [b, V]
            masked = masked_slots(list(current.ids))
            if with_laws:
                if count != 1:
                    raise DiffdraftError("rejection sampling needs one slot per step (steps per block = block size)")
                law = step_law(logits, masked, sampling)  # [b*V]
                step = Step.from_flat(int(sample(law, generator)), logits.shape[1])
                laws.append(law)
            else:
                step = choose_step(logits, masked, count, sampling, generator)
            steps.append(step)
            current = current.advance(step)
        return StepDraft(steps=steps, laws=torch.stack(laws) if laws else None)
