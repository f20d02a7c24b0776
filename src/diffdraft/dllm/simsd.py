"""SimSD: verify a drafted block-diffusion trajectory with one target forward.

The drafter proposes the current block's next S steps (slots + tokens: every drafted token
labelled with the step that reveals it). One target forward over the layout of
masks.simsd_layout gives, at every state j = 0..S, the target's logits for the block as
it would stand after the first j drafted steps (references revealed before step j in
place, MASK elsewhere, positions copied from their slots), plus, when the draft fills the
block, the next block's first step with the filled block as its finished context.
Acceptance, in reveal order (pure, in terms of diffdraft.verify):

- greedy / point-mass: the target's own decision at each state is computed by the very
  rule of its own decoding (unmask.choose_step: greedy, or sampled with the generator);
  drafted step j is accepted while it equals that decision (slots and tokens), and the
  target's decision at the first mismatch (recovered) or after the last step (bonus) is
  appended. The comparison is verify.verify_greedy over codes of the decisions.
- rejection (one slot per step): speculative rejection sampling with
  verify.verify_rejection over the outcome space (slot, token), p = unmask.step_law of
  the target's logits, q = the drafter's stated laws.

What the output equals. At temperature 0 the tokens are identical to the target's own
greedy decoding (decode.decode) with the same steps per block, whatever the drafter: each
emitted step is the target's decision at a state that is exactly the state its own
decoding would be in, because every state's logits come from a copy of the block that
sees only the cache, the finished blocks and the steps already accepted, the same inputs
and attention pattern as decode's forward. Equality is up to floating-point rounding of
the two forwards (keys ordered and batched differently), as for every equality claim in
diffdraft (float32 in tests). Above temperature 0 the output has the law of the target's
own sampled decoding: point-mass matching is lossless for any drafter, and rejection
sampling is lossless because the drafter's q is the exact law of each step given the
earlier ones and p is the exact law of the target's rule (step_law).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from diffdraft.config import SamplingConfig
from diffdraft.dllm.budget import StepBudget
from diffdraft.dllm.decode import DLLMResult, Output, Session, settle
from diffdraft.dllm.drafter import DLLMDrafter, StepDraft
from diffdraft.dllm.masks import reveal_labels, simsd_layout, state_ids
from diffdraft.dllm.model import BlockDiffusionLM
from diffdraft.dllm.runtime import Blocks
from diffdraft.dllm.unmask import Step, choose_step, masked_slots, schedule, step_law
from diffdraft.errors import DiffdraftError
from diffdraft.verify import verify_greedy, verify_rejection

MODES = ("auto", "greedy", "point-mass", "rejection")


def resolve_mode(mode: str, sampling: SamplingConfig, block_size: int, steps: int) -> str:
    """auto: greedy at temperature 0, rejection when every step reveals one slot, else point-mass."""
    if mode not in MODES:
        raise DiffdraftError(f"verify mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        if sampling.greedy:
            return "greedy"
        return "rejection" if steps == block_size else "point-mass"
    if mode == "greedy" and not sampling.greedy:
        raise DiffdraftError("greedy verification needs temperature 0")
    if mode == "rejection" and steps != block_size:
        raise DiffdraftError("rejection sampling needs one slot per step: set steps per block = block size")
    return mode


def accept(
    mode: str,
    draft: StepDraft,
    logits: list[torch.Tensor],  # S+1 x [b, V]: the target at states 0..S
    masked: list[torch.Tensor],  # S+1 x [b] bool: masked slots at each state
    counts: list[int],  # S+1: slots the target's rule reveals at each state
    sampling: SamplingConfig,
    generator: torch.Generator | None,
) -> tuple[int, Step]:
    """Drafted steps accepted (0..S) and the target's own step after them (recovered or bonus)."""
    num_steps = len(draft.steps)
    if not len(logits) == len(masked) == len(counts) == num_steps + 1:
        raise ValueError("need the target at S+1 states for S drafted steps")
    if mode == "rejection":
        if draft.laws is None:
            raise DiffdraftError("rejection sampling needs the drafter's laws q")
        vocab = logits[0].shape[1]
        target_laws = torch.stack([step_law(row, m, sampling) for row, m in zip(logits, masked)])  # [S+1, b*V]
        flat = torch.tensor([step.flat(vocab) for step in draft.steps], dtype=torch.long)  # [S]
        verdict = verify_rejection(flat, draft.laws, target_laws, generator)
        return verdict.num_accepted, Step.from_flat(verdict.tokens[-1], vocab)
    decisions = [choose_step(row, m, c, sampling, generator) for row, m, c in zip(logits, masked, counts)]
    codes: dict[Step, int] = {}
    for step in decisions + draft.steps:
        codes.setdefault(step, len(codes))
    target_rows = torch.zeros(num_steps + 1, len(codes))  # [S+1, K] one-hot on the target's decision
    target_rows[torch.arange(num_steps + 1), torch.tensor([codes[s] for s in decisions])] = 1.0
    drafted = torch.tensor([codes[s] for s in draft.steps], dtype=torch.long)  # [S]
    verdict = verify_greedy(drafted, target_rows)
    return verdict.num_accepted, decisions[verdict.num_accepted]


def decode_simsd(
    target: BlockDiffusionLM | Blocks,
    drafter: DLLMDrafter,
    prompt: list[int],
    steps: int,
    max_new_tokens: int,
    sampling: SamplingConfig | None = None,
    generator: torch.Generator | None = None,
    eos_ids: frozenset[int] = frozenset(),
    mode: str = "auto",
    max_draft_steps: int | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
    should_stop: Callable[[], str | None] | None = None,
    budget: StepBudget | None = None,
) -> DLLMResult:
    """Blockwise decoding of `target` sped up by SimSD (see the module docstring); on_tokens and
    should_stop as in decode.Output. With a `budget` (budget.py), greedy verification drafts as many
    steps (up to the limit) as the measured costs and the acceptance seen so far make worth it, 0
    included; otherwise every verification drafts the most steps it may."""
    sampling = sampling or SamplingConfig()
    net = target if isinstance(target, BlockDiffusionLM) else target.net  # the model, on whichever runtime
    b = net.block_size
    counts = schedule(b, steps)
    mode = resolve_mode(mode, sampling, b, steps)
    drafter.check_compatible(net)
    if max_draft_steps is not None and max_draft_steps < 1:
        raise DiffdraftError(f"max draft steps must be >= 1, got {max_draft_steps}")
    start = time.perf_counter()
    session = Session(target)
    block = session.begin(prompt, max_new_tokens)
    draft_state = drafter.new_state()
    drafter.begin(draft_state, prompt, max_new_tokens)
    output = Output(max_new_tokens, eos_ids, on_tokens, should_stop)
    result = DLLMResult(tokens=[], forwards=0, seconds=0.0)
    while True:
        num_steps = min(steps - block.step, max_draft_steps or steps)
        if budget is not None and mode == "greedy":
            num_steps = budget.choose(num_steps, carried=len(session.unsent) * b)
        draft = drafter.propose(draft_state, output.blocks, block, counts[block.step : block.step + num_steps],
                                sampling, with_laws=mode == "rejection", generator=generator)
        labels = reveal_labels(list(block.ids), [s.slots for s in draft.steps])
        tokens = list(block.ids)
        for step in draft.steps:
            tokens = step.apply(tokens)
        layout = simsd_layout(session.length, session.unsent, block.start, list(block.ids), tokens, labels,
                              num_steps)
        rows = session.run(layout.ids, layout.positions, layout.mask)  # [T, V]
        fills = layout.final_clean is not None
        next_before = rows[layout.final_clean.stop - 1] if fills else session.before  # [V] predicts final slot 0
        logits = [net.slot_hidden(session.before, rows[r]) for r in layout.states]  # S+1 x [b, V]
        logits.append(net.slot_hidden(next_before, rows[layout.final]))
        masked = [masked_slots(state_ids(list(block.ids), tokens, labels, j)) for j in range(num_steps)]
        masked.append(torch.ones(b, dtype=torch.bool) if fills else masked_slots(tokens))
        step_counts = counts[block.step : block.step + num_steps] + [counts[0] if fills else counts[block.step + num_steps]]
        accepted, last = accept(mode, draft, logits, masked, step_counts, sampling, generator)
        if budget is not None and mode == "greedy":
            budget.observe(num_steps, accepted)
        result.accepted.append(accepted)
        result.drafted.append(num_steps)
        result.revealed.append(sum(len(s.slots) for s in draft.steps[:accepted]) + len(last.slots))
        for step in draft.steps[:accepted]:
            block = block.advance(step)
        if accepted == num_steps and fills:  # the drafted block is final and already ran clean: cache it
            session.keep(rows, layout.final_clean)
            if output.add(block.ids):
                break
            block = block.next_block()
        block = settle(block.advance(last), session, output)
        if block is None:
            break
    result.tokens = output.tokens()
    result.forwards = session.forwards
    result.draft_forwards = draft_state.session.forwards
    result.seconds = time.perf_counter() - start
    result.first_block_s = output.first_at - start
    result.stopped = output.stopped
    return result

