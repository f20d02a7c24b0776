"""SimSD against the target's own decoding.

Temperature 0: the statement of simsd.py is that SimSD's tokens are identical to the
target's own greedy decoding (decode.decode) with the same steps per block, whatever the
drafter. Checked on tiny converted models (random adapters and mask embedding) for several
block sizes, step counts and draft lengths, with an oracle drafter (the target itself:
everything accepted), a slightly perturbed one (some steps accepted, some rejected) and a
shallow one (nearly everything rejected). Negative control: an acceptance that takes every
drafted step must change the output, so the equality test has teeth.

Above temperature 0: a pure harness runs the acceptance of simsd.accept over table
"models" (logits as a seeded function of the block state, V = 3, b = 3, one slot per
step) and compares the law of the whole trajectory (reveal order and tokens) with the
target's own law enumerated by brute force over the rule; a verifier that judges only the
token at the drafted slot must fail the same check. End to end, decode_simsd on a tiny
4-token Llama matches the enumerated law of the block its own sampled decoding produces.
"""

from __future__ import annotations

import itertools
from collections import defaultdict

import pytest
import torch

from conftest import make_llama
from diffdraft.config import SamplingConfig
from diffdraft.dllm import simsd
from diffdraft.dllm.decode import Session, decode
from diffdraft.dllm.drafter import DLLMDrafter, StepDraft
from diffdraft.dllm.model import MASK_ID
from diffdraft.dllm.runtime import blocks_for
from diffdraft.dllm.simsd import accept, decode_simsd, resolve_mode
from diffdraft.dllm.unmask import Step, choose_step, masked_slots, step_law
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_probs, sample
from lawcheck import fit
from test_dllm_model import converted

PROMPT = [5, 9, 33, 100, 7]


@pytest.fixture(scope="module")
def peaked():
    return make_llama(init_range=0.2)


def perturbed(base, block_size: int, std: float = 0.01):
    """The target's twin with slightly moved adapters: agrees on most decisions, not all."""
    net = converted(base, block_size, seed=1)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for b in net.adapters.b.values():
            b.add_(torch.randn(b.shape, generator=gen) * std)
    return net


# ------------------------------------------------------------------------------ temperature 0
@pytest.mark.parametrize("runtime", ["module", "lean"])
@pytest.mark.parametrize("block_size, steps, max_draft", [(4, 4, None), (4, 2, None), (8, 8, None), (8, 8, 3),
                                                          (8, 4, None), (3, 2, 1), (1, 1, None)])
def test_greedy_simsd_equals_own_greedy_decoding(peaked, tiny_tokenizer, block_size, steps, max_draft, runtime):
    """On the module and on the lean runtime's row forward (runtime.py), whatever the drafter."""
    target = blocks_for(converted(peaked, block_size, seed=1), runtime, tiny_tokenizer)
    expected = decode(target, PROMPT, steps, max_new_tokens=40)
    assert len(expected.tokens) == 40
    drafters = {"oracle": target.net, "perturbed": perturbed(peaked, block_size),
                "shallow": converted(peaked, block_size, 2)}
    accepted = {}
    for name, net in drafters.items():
        result = decode_simsd(target, DLLMDrafter(net), PROMPT, steps, 40, max_draft_steps=max_draft)
        assert result.tokens == expected.tokens, name
        accepted[name] = (sum(result.accepted), sum(result.drafted), result.forwards)
    drafted_all, forwards = accepted["oracle"][1], accepted["oracle"][2]
    assert accepted["oracle"][0] == drafted_all and forwards < expected.forwards  # nothing rejected, fewer forwards
    assert accepted["shallow"][0] < accepted["shallow"][1]  # rejections (recovered steps) happened
    if block_size > 1:
        assert 0 < accepted["perturbed"][0] < accepted["perturbed"][1], accepted["perturbed"]


def test_greedy_equality_with_end_token(peaked):
    """Stopping at an end token inside a block gives the same cut as the target's own decoding."""
    target = converted(peaked, 4, seed=1)
    free = decode(target, PROMPT, 4, max_new_tokens=40).tokens
    eos = frozenset({free[13]})  # an end token in the middle of the 4th block
    expected = decode(target, PROMPT, 4, max_new_tokens=40, eos_ids=eos)
    assert expected.tokens == free[: free.index(free[13]) + 1]
    result = decode_simsd(target, DLLMDrafter(perturbed(peaked, 4)), PROMPT, 4, 40, eos_ids=eos)
    assert result.tokens == expected.tokens


def test_negative_control_accepting_every_draft_changes_the_output(peaked, monkeypatch):
    target = converted(peaked, 4, seed=1)
    expected = decode(target, PROMPT, 4, max_new_tokens=40).tokens

    def accept_all(mode, draft, logits, masked, counts, sampling, generator):
        last = choose_step(logits[-1], masked[-1], counts[-1], sampling, generator)
        return len(draft.steps), last

    monkeypatch.setattr(simsd, "accept", accept_all)
    wrong = decode_simsd(target, DLLMDrafter(perturbed(peaked, 4)), PROMPT, 4, 40).tokens
    assert wrong != expected


def test_modes_and_bad_input(peaked):
    t0, t1 = SamplingConfig(), SamplingConfig(temperature=1.0)
    assert resolve_mode("auto", t0, 4, 4) == "greedy"
    assert resolve_mode("auto", t1, 4, 4) == "rejection"
    assert resolve_mode("auto", t1, 4, 2) == "point-mass"
    for mode, sampling, steps in (("greedy", t1, 4), ("rejection", t1, 2), ("fast", t0, 4)):
        with pytest.raises(DiffdraftError):
            resolve_mode(mode, sampling, 4, steps)
    target = converted(peaked, 4, seed=1)
    with pytest.raises(DiffdraftError):
        decode_simsd(target, DLLMDrafter(converted(peaked, 2, seed=1)), PROMPT, 4, 8)  # block sizes differ
    with pytest.raises(DiffdraftError):
        decode(target, [], 4, 8)
    with pytest.raises(DiffdraftError):
        decode(target, PROMPT, 4, 10_000)  # past the tiny model's 256 positions


# --------------------------------------------------------------- sampled: pure harness on tables
B, V = 3, 3
HOT = SamplingConfig(temperature=1.0)


class Table:
    """A 'model' whose logits [B, V] are a seeded function of the block state."""

    def __init__(self, seed: int, scale: float, base: "Table | None" = None, mix: float = 0.0):
        self.seed, self.scale, self.base, self.mix = seed, scale, base, mix
        self._memo: dict[tuple, torch.Tensor] = {}

    def logits(self, state: tuple) -> torch.Tensor:
        if state not in self._memo:
            gen = torch.Generator().manual_seed(hash((self.seed,) + tuple(state)) % (2**31))
            own = self.scale * torch.randn(B, V, generator=gen)
            self._memo[state] = own if self.base is None else self.base.logits(state) + self.mix * own
        return self._memo[state]


def exact_trajectory_law(table: Table) -> dict:
    """Law of ((slot, token), ...) of the target's own sampled decoding of one block, by brute force."""
    law: dict = defaultdict(float)

    def walk(state: tuple, prefix: tuple, weight: float):
        slots = [p for p in range(B) if state[p] == MASK_ID]
        if not slots:
            law[prefix] += weight
            return
        probs = logits_to_probs(table.logits(state), HOT).double()
        outcomes: dict = defaultdict(float)
        for draw in itertools.product(range(V), repeat=len(slots)):
            w = 1.0
            for p, x in zip(slots, draw):
                w *= float(probs[p, x])
            conf = {p: float(probs[p, x]) for p, x in zip(slots, draw)}
            winner = min(slots, key=lambda p: (-conf[p], p))
            outcomes[(winner, draw[slots.index(winner)])] += w
        for (p, x), w in outcomes.items():
            nxt = list(state)
            nxt[p] = x
            walk(tuple(nxt), prefix + ((p, x),), weight * w)

    walk((MASK_ID,) * B, (), 1.0)
    return dict(law)


def simsd_trajectory(target: Table, drafter: Table, mode: str, acceptor, gen, max_draft: int) -> tuple:
    """One block decoded by draft-then-verify rounds over tables; returns its trajectory."""
    state, trajectory = (MASK_ID,) * B, []
    while MASK_ID in state:
        remaining = sum(t == MASK_ID for t in state)
        steps, laws, states = [], [], [state]
        for _ in range(min(remaining, max_draft)):
            logits, masked = drafter.logits(states[-1]), masked_slots(list(states[-1]))
            if mode == "rejection":
                law = step_law(logits, masked, HOT)
                step = Step.from_flat(int(sample(law, gen)), V)
                laws.append(law)
            else:
                step = choose_step(logits, masked, 1, HOT, gen)
            steps.append(step)
            states.append(tuple(step.apply(list(states[-1]))))
        fills = MASK_ID not in states[-1]
        rows = [target.logits(s) for s in states[:-1]] + [target.logits(("next",) * B) if fills
                                                          else target.logits(states[-1])]
        masked = [masked_slots(list(s)) for s in states[:-1]] + [torch.ones(B, dtype=torch.bool) if fills
                                                                  else masked_slots(list(states[-1]))]
        draft = StepDraft(steps=steps, laws=torch.stack(laws) if laws else None)
        accepted, last = acceptor(mode, draft, rows, masked, [1] * len(rows), HOT, gen)
        for step in steps[:accepted]:
            state = tuple(step.apply(list(state)))
            trajectory.append((step.slots[0], step.tokens[0]))
        if MASK_ID in state:
            state = tuple(last.apply(list(state)))
            trajectory.append((last.slots[0], last.tokens[0]))
    return tuple(trajectory)


def token_only_acceptor(mode, draft, logits, masked, counts, sampling, generator):
    """WRONG: rejection sampling on the token at the drafter's slot only, as if the slot were given."""
    for j, step in enumerate(draft.steps):
        (slot,), (token,) = step.slots, step.tokens
        p = logits_to_probs(logits[j][slot], sampling)  # the target's token law at that slot
        q = draft.laws[j].view(B, V)[slot] / draft.laws[j].view(B, V)[slot].sum()  # the drafter's, given the slot
        if float(torch.rand(1, generator=generator)) >= float(p[token] / q[token]):
            residual = (p - q).clamp(min=0)
            return j, Step(slots=(slot,), tokens=(int(sample(residual / residual.sum(), generator)),))
    return len(draft.steps), choose_step(logits[-1], masked[-1], 1, sampling, generator)


TARGET = Table(seed=1, scale=1.5)
DRAFTER = Table(seed=2, scale=1.0, base=TARGET, mix=0.8)


@pytest.mark.parametrize("mode, max_draft", [("rejection", 3), ("rejection", 2), ("point-mass", 3)])
def test_sampled_simsd_trajectory_has_the_target_law(mode, max_draft):
    gen = torch.Generator().manual_seed(7)
    samples = [simsd_trajectory(TARGET, DRAFTER, mode, accept, gen, max_draft) for _ in range(2000)]
    result = fit(samples, exact_trajectory_law(TARGET))
    assert result.ok, str(result)


def test_sampled_wrong_verifier_is_detected():
    gen = torch.Generator().manual_seed(7)
    samples = [simsd_trajectory(TARGET, DRAFTER, "rejection", token_only_acceptor, gen, 3) for _ in range(2000)]
    result = fit(samples, exact_trajectory_law(TARGET))
    assert not result.ok, str(result)


# ------------------------------------------------------------------------ sampled: end to end
def test_sampled_simsd_end_to_end_on_a_tiny_llama():
    """decode_simsd (rejection, b = 2) on a 4-token Llama: the block's law is the target's own."""
    base = make_llama(vocab_size=4, layers=1, hidden=32, heads=2, kv_heads=1, init_range=0.5, eos_token_id=None)
    target = converted(base, 2, seed=1, adapter_std=0.3)
    drafter = DLLMDrafter(converted(base, 2, seed=2, adapter_std=0.3))
    prompt = [1, 2, 3]
    session = Session(target)
    start = session.begin(prompt, 2)
    exact: dict = defaultdict(float)
    first = step_law(session.block_logits(start), masked_slots(list(start.ids)), HOT)
    for index in torch.nonzero(first).flatten().tolist():
        step = Step.from_flat(index, 4)
        middle = start.advance(step)
        second = step_law(session.block_logits(middle), masked_slots(list(middle.ids)), HOT)
        for j in torch.nonzero(second).flatten().tolist():
            exact[middle.advance(Step.from_flat(j, 4)).ids] += float(first[index]) * float(second[j])
    gen = torch.Generator().manual_seed(0)
    samples, accepted = [], 0
    for _ in range(500):
        result = decode_simsd(target, drafter, prompt, 2, 2, HOT, gen, mode="rejection")
        samples.append(tuple(result.tokens))
        accepted += sum(result.accepted)
    outcome = fit(samples, dict(exact))
    assert outcome.ok, str(outcome)
    assert 0 < accepted < 2 * 500  # both accepted and rejected steps happened
