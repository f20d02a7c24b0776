"""The speculative decoding loop (docs/design.md, 'The loop').

prefill -> first token; then repeat: the drafter proposes g tokens, the target runs one
forward over [last token, draft], the verifier accepts a prefix and adds one token of the
target's own, and the target cache is cropped to what was accepted. With no drafter (or
g = 0) it is plain decoding, one target forward per token, through the same code.
How many drafted tokens a step verifies is the length rule's choice (draft_length.py), made
from the drafter's output and past steps only, or a fixed length, or the confidence cut.
The loop is begin() (check, prefill, first token), then per step plan() (draft and size the
rows), one target forward, conclude() (verify, commit, emit): generate() runs it for one
request, diffdraft.batching for many sharing each step's forward. The engine holds what is
shared by requests (the target and drafter with their weights, the settings, the length rule);
each request has its own RequestState inside its Generation (the target's KV cache, the
drafter's context, the tokens, the generator, the stats), dropped when it ends, so any number
of generations may run at once on one loaded target and drafter. The drafter and verifier draw
from the request's generator.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.costs import cost_curve
from diffdraft.draft_length import NO_CONFIDENCE, CostCurve, DraftingValue, LengthPolicy
from diffdraft.draft_tree import DraftTree, best_first, best_size, branch_nodes, followed, top_chain, with_branch
from diffdraft.drafters.ngram import MAX_NGRAM, lookup_continuation
from diffdraft.drafters.base import Draft, Drafter
from diffdraft.errors import DiffdraftError
from diffdraft.logprobs import TokenLogprob, check_top, token_logprobs
from diffdraft.prompting import check_seed, check_started
from diffdraft.sampling import logits_to_probs, position_uniforms, sample
from diffdraft.stats import Stats
from diffdraft.target import Rows, SequenceRows, TargetBackend, TargetOutput, TargetState
from diffdraft.verify import (Verdict, verify_greedy, verify_point_mass, verify_rejection, verify_tree_greedy,
                              verify_tree_point_mass)


def confident_length(draft: Draft, limit: int, min_confidence: float) -> int:
    """How many draft tokens to verify: at most `limit`, and with min_confidence > 0 only the longest
    prefix whose product of drafter confidences stays >= min_confidence."""
    n = min(limit, draft.tokens.shape[0])
    if min_confidence <= 0 or draft.confidence is None or n == 0:
        return n
    prefix = draft.confidence[:n].double().cumprod(dim=0)  # [n]
    return int((prefix >= min_confidence).int().cumprod(dim=0).sum())


def uses_length_rule(drafter: Drafter | None, draft: DraftConfig) -> bool:
    """Whether an engine with this drafter and config lets the length rule choose what to verify."""
    return drafter is not None and draft.length == "auto" and draft.min_confidence == 0 and draft.draft_len > 0


def request_capacity(target: TargetBackend, drafter: Drafter | None, draft: DraftConfig, prompt_tokens: int,
                     max_new_tokens: int) -> int:
    """The cache a request needs, in tokens: its prompt and answer, and room for the widest step's rows beyond
    them (the last token, then a chain of draft_len or a tree), within the model's context."""
    widest = 1 + (max(draft.draft_len, draft.tree) if drafter is not None else 0)
    return min(target.max_context, prompt_tokens + max_new_tokens + widest)


def length_policy(target: TargetBackend, drafter: Drafter | None, draft: DraftConfig) -> LengthPolicy | None:
    """The length rule for this drafter and config (costs measured, or read from the cache), or None
    where none is used. Made once and handed to every engine, it keeps its calibration across requests."""
    return LengthPolicy(cost_curve(target, drafter, draft.draft_len)) if uses_length_rule(drafter, draft) else None


@dataclass
class RequestState:
    """Everything one generation changes as it runs; nothing of it outlives the request."""

    tokens: list[int]  # prompt + tokens emitted so far
    target: TargetState  # the target's KV cache of this sequence
    drafter: object  # the drafter's own state of this sequence (its context cache), or None
    generator: torch.Generator
    stats: Stats
    drafting: DraftingValue | None = None  # whether drafting has paid lately in this request (the length rule's)
    seed: int = 0
    prompt_len: int = 0
    # Tapped features of committed tokens the drafter has not read yet, [1, n, n_taps * D] each: handed over
    # in one observe() just before it drafts again, so steps that do not draft cost it nothing.
    unread_taps: list = field(default_factory=list)

    def uniforms(self, count: int) -> torch.Tensor:
        """The uniforms of the next `count` answer positions (sampling.position_uniforms): [count]."""
        return position_uniforms(self.seed, len(self.tokens) - self.prompt_len, count)


@dataclass
class GenerationResult:
    tokens: list[int]  # new tokens, EOS included when it ended the answer
    stop_reason: str  # "eos", "length" (max_new_tokens), "context" (model context full), or should_stop's reason
    stats: Stats
    logprobs: list[TokenLogprob] | None = None  # one per token, when asked for


@dataclass
class Emitted:
    """What one step of a generation hands out: its new tokens and, when asked for, their log probabilities."""

    tokens: list[int]
    logprobs: list[TokenLogprob] | None = None


@dataclass
class Step:
    """One generation's step between plan() and conclude(): the rows it gives the target forward and what
    verification needs of its draft."""

    drafted: int  # slots the drafter was asked for (0: a plain step)
    start: int  # the committed length the rows follow
    tick: float  # when planning began
    costs: CostCurve | None = None  # the length rule's costs for this step (its share of a batch's forward)
    room: int = 0  # cache slots left after the last token's: the most drafted rows the step may run
    tock: float = 0.0  # when planning ended
    part: SequenceRows | None = None  # the rows: [last token, *draft] (a chain) or a tree's nodes
    draft: Draft | None = None  # the verified chain (a chain step)
    full_draft: Draft | None = None  # what the drafter proposed, before the length rule cut it
    tree: DraftTree | None = None  # the verified tree (a tree step)
    lookup: list[int] = field(default_factory=list)  # the tree's n-gram branch


@dataclass
class Generation:
    """One request in flight on an engine: its RequestState and what it has emitted (begin() makes it)."""

    engine: "SpeculativeEngine"
    request: RequestState
    max_new_tokens: int
    top: int | None = None  # logprobs asked for (alternatives per token), or None
    want_taps: bool = False
    tokens: list[int] = field(default_factory=list)  # new tokens so far, EOS included when it ended the answer
    logprobs: list[TokenLogprob] | None = None
    stop_reason: str | None = None  # set when it has ended
    first: Emitted | None = None  # the prefill's emission
    started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.top is not None:
            self.logprobs = []

    def take(self, tokens: list[int], rows: torch.Tensor) -> Emitted:
        """Record a step's tokens; rows [>= len(tokens), V]: the logits that decided them."""
        entries = None
        if self.top is not None:
            entries = token_logprobs(rows[: len(tokens)], tokens, self.engine.sampling, self.top) if tokens else []
            self.logprobs.extend(entries)
        self.request.tokens.extend(tokens)
        self.tokens.extend(tokens)
        return Emitted(tokens, entries)

    @staticmethod
    def deliver(emitted: Emitted, on_tokens: Callable[[list[int]], None] | None,
                on_logprobs: Callable[[list[TokenLogprob]], None] | None) -> None:
        """Hand an emission to callbacks: the log probabilities first, then the tokens."""
        if not emitted.tokens:
            return
        if on_logprobs is not None and emitted.logprobs:
            on_logprobs(emitted.logprobs)
        if on_tokens is not None:
            on_tokens(emitted.tokens)

    def result(self) -> GenerationResult:
        stats = self.request.stats
        stats.total_s = time.perf_counter() - self.started
        stats.new_tokens = len(self.tokens)
        return GenerationResult(tokens=self.tokens, stop_reason=self.stop_reason, stats=stats, logprobs=self.logprobs)


class SpeculativeEngine:
    """Lossless speculative decoding of one target with one drafter (or none)."""

    def __init__(
        self,
        target: TargetBackend,
        drafter: Drafter | None = None,
        draft: DraftConfig | None = None,
        sampling: SamplingConfig | None = None,
        policy: LengthPolicy | None = None,
    ):
        """policy: the length rule for draft.length == "auto" (kept across requests, it calibrates
        itself); without one the engine measures this machine's costs (cached) and makes one."""
        self.target = target
        self.drafter = drafter
        self.draft = draft or DraftConfig()
        self.sampling = sampling or SamplingConfig()
        if drafter is not None:
            drafter.check_compatible(target)
            if self.draft.verify == "rejection" and not self.sampling.greedy and not drafter.states_q:
                raise DiffdraftError(
                    f"the {drafter.name} drafter states no exact q, so rejection sampling cannot verify it: "
                    "use verify=point-mass or auto"
                )
        self.policy = (policy or length_policy(target, drafter, self.draft)) if uses_length_rule(drafter, self.draft) \
            else None
        # What the drafter is asked to draw from: the target's own sampling, or each slot's argmax.
        self.proposal_sampling = SamplingConfig() if self.draft.proposals == "argmax" else self.sampling

    @property
    def draft_len(self) -> int:
        return self.draft.draft_len if self.drafter is not None else 0

    def generate(
        self,
        prompt: list[int],
        max_new_tokens: int = 128,
        seed: int = 0,
        on_tokens: Callable[[list[int]], None] | None = None,
        should_stop: Callable[[], str | None] | None = None,
        logprobs: int | None = None,
        on_logprobs: Callable[[list[TokenLogprob]], None] | None = None,
    ) -> GenerationResult:
        """Generate up to max_new_tokens tokens after `prompt` (token ids, template applied): the step loop
        over a batch of one (diffdraft.batching runs the same steps for many requests at once).

        on_tokens receives each step's new tokens; should_stop, asked before each step, ends the
        generation when it returns a reason (a cancelled request, a deadline), which becomes the
        stop reason. logprobs (0..20 alternatives) adds the target's log probability of every token
        (diffdraft.logprobs), handed to on_logprobs just before on_tokens gets the same tokens."""
        steps = self.stream(prompt, max_new_tokens, seed, logprobs, should_stop)
        while True:
            try:
                Generation.deliver(next(steps), on_tokens, on_logprobs)
            except StopIteration as done:
                return done.value

    def stream(self, prompt: list[int], max_new_tokens: int = 128, seed: int = 0, logprobs: int | None = None,
               should_stop: Callable[[], str | None] | None = None) -> Iterator[Emitted]:
        """generate() as a generator: yields each step's Emitted (the prefill's first token, then each verify
        step's), returns the GenerationResult (StopIteration.value). Closing it ends the request there."""
        generation = self.begin(prompt, max_new_tokens, seed, logprobs)
        yield generation.first
        while (step := self.plan(generation, should_stop)) is not None:
            out = self.target.forward_many([step.part], want_taps=generation.want_taps)[0]
            yield self.conclude(generation, step, out)
        return generation.result()

    def begin(self, prompt: list[int], max_new_tokens: int = 128, seed: int = 0,
              logprobs: int | None = None) -> "Generation":
        """Check a request, prefill its prompt and pick its first token: a Generation, whose first emission
        is `first`, ready for its steps (plan, one target forward, conclude)."""
        if not prompt:
            raise DiffdraftError("the prompt is empty")
        check_started(self.target, len(prompt), max_new_tokens)
        check_seed(seed)
        check_top(logprobs)
        stats = Stats(draft_len=self.draft_len, cost_curve=self.policy.costs.to_dict() if self.policy else None)
        request = RequestState(tokens=list(prompt), target=self.target.new_state(
                                   request_capacity(self.target, self.drafter, self.draft, len(prompt), max_new_tokens)),
                               drafter=self.drafter.new_state() if self.drafter is not None else None,
                               generator=torch.Generator().manual_seed(seed), stats=stats,
                               drafting=self.policy.new_value() if self.policy is not None else None,
                               seed=seed, prompt_len=len(prompt))
        generation = Generation(engine=self, request=request, max_new_tokens=max_new_tokens, top=logprobs,
                                want_taps=self.drafter is not None and self.drafter.wants_taps)

        out = self.target.prefill(request.target, torch.tensor([prompt], dtype=torch.long),
                                  want_taps=generation.want_taps)
        if self.drafter is not None:
            self.drafter.begin(request.drafter, list(prompt), out.taps)
        first = self._pick(out.logits[0, -1], request)
        stats.ttft_s = time.perf_counter() - generation.started
        generation.first = generation.take([first], out.logits[0, -1:])
        if first in self.target.eos_token_ids:
            generation.stop_reason = "eos"
        return generation

    def kv_bytes(self, prompt_tokens: int, max_new_tokens: int) -> int:
        """Bytes of the target's KV cache a request reserves (request_capacity)."""
        return self.target.kv_bytes(request_capacity(self.target, self.drafter, self.draft, prompt_tokens,
                                                     max_new_tokens))

    def plan(self, generation: "Generation", should_stop: Callable[[], str | None] | None = None,
             sequences: int = 1) -> "Step | None":
        """The next step of a generation up to its target forward: the rows to run (drafted and sized by the
        length rule, or a plain step), or None when it has ended (its stop_reason says why: eos, length,
        should_stop's reason, or context). sequences: how many requests share the step's forward (a batch);
        the length rule then prices rows as this request's share of it (CostCurve.in_batch)."""
        if generation.stop_reason is not None:
            return None
        request = generation.request
        if len(generation.tokens) >= generation.max_new_tokens:
            generation.stop_reason = "length"
            return None
        if should_stop is not None and (reason := should_stop()) is not None:
            generation.stop_reason = reason
            return None
        room = request.target.capacity - request.target.length - 1  # after feeding the last token
        if room < 1:
            generation.stop_reason = "context"
            return None
        g = max(min(self.draft_len, generation.max_new_tokens - len(generation.tokens) - 1, room - 1), 0)
        tick = time.perf_counter()
        costs = self.policy.costs.in_batch(sequences) if self.policy is not None else None
        if self.policy is not None:
            g = self.policy.longest_useful(g, costs)  # the drafter computes only slots that could be verified
            if g > 0 and not request.drafting.draft_now(costs, sequences):  # drafting has not paid lately: plain step
                g = 0
            if g > 0 and self.draft.tree <= 0:  # a chain: as many slots as pay for what the drafter spends on them
                g = self.policy.proposal(g, self.sampling.greedy, costs)
        step = Step(drafted=g, start=request.target.length, tick=tick, costs=costs, room=room)
        if g > 0:
            if request.unread_taps:  # the drafter catches up on what was committed since it last drafted
                taps = request.unread_taps
                self.drafter.observe(request.drafter, taps[0] if len(taps) == 1 else torch.cat(taps, dim=1))
                request.unread_taps = []
            draft = self.drafter.propose(request.drafter, request.tokens, g, self.proposal_sampling, request.generator)
            if self._tree_for(draft):
                return self._plan_tree(request, draft, step)
            if self.policy is not None:  # reads the drafter's confidences and past steps, never this step's target
                keep = self.policy.choose(draft.confidence, draft.tokens.shape[0], self.sampling.greedy, costs)
            else:
                keep = confident_length(draft, g, self.draft.min_confidence)
            step.full_draft = draft
            draft = draft.truncated(keep)
        else:
            draft = Draft.empty()
        step.draft = draft
        block = torch.tensor([request.tokens[-1]] + draft.tokens.tolist(), dtype=torch.long)  # [1 + drafted]
        step.part = SequenceRows(request.target, block)
        step.tock = time.perf_counter()
        request.stats.draft_s += step.tock - tick
        return step

    def conclude(self, generation: "Generation", step: "Step", out: TargetOutput) -> "Emitted":
        """Verify a planned step against its target forward's output, commit what was accepted and return
        the tokens it emits (cut at EOS and at max_new_tokens)."""
        request = generation.request
        if step.tree is not None:
            verdict, logits = self._conclude_tree(request, step, out)
        else:
            verdict, logits = self._conclude_chain(request, step, out)
        emitted = verdict.tokens[: generation.max_new_tokens - len(generation.tokens)]
        for i, token in enumerate(emitted):
            if token in self.target.eos_token_ids:
                emitted = emitted[: i + 1]
                generation.stop_reason = "eos"
                break
        proposed = len(step.tree) if step.tree is not None else step.draft.tokens.shape[0]
        request.stats.record_step(proposed=proposed, accepted=verdict.num_accepted, emitted=len(emitted))
        request.stats.verify_s += time.perf_counter() - step.tock
        return generation.take(emitted, logits)

    def _pick(self, logits: torch.Tensor, request: RequestState) -> int:
        """The target's own next token from logits [V], drawn with its position's uniform."""
        if self.sampling.greedy:
            return int(logits.argmax())
        return int(sample(logits_to_probs(logits, self.sampling), None, request.uniforms(1)))

    def _conclude_chain(self, request: RequestState, step: "Step", out: TargetOutput) -> tuple[Verdict, torch.Tensor]:
        """Verify a chain (or a plain step): the verdict and the logits rows that decided its tokens."""
        draft, greedy = step.draft, self.sampling.greedy
        drafted = draft.tokens.shape[0]
        verdict = self._verify(draft, out.logits[0], request)  # logits [1+g, V]
        self.target.crop(request.target, request.target.length - (drafted - verdict.num_accepted))
        if self.policy is not None and step.drafted > 0:  # the drafter was called, whatever it was left to verify
            self.policy.observe(step.full_draft.confidence, drafted, verdict.num_accepted, greedy)
            request.drafting.observe(drafted, verdict.num_accepted, step.costs, proposed=step.drafted)
        if self.drafter is not None and out.taps is not None:
            request.unread_taps.append(out.taps[:, : 1 + verdict.num_accepted])
        return verdict, out.logits[0]

    def _tree_for(self, draft: Draft) -> bool:
        """Whether this step verifies a tree: asked for, the drafter states alternatives, the target takes
        trees, and the verification is greedy or point-mass (rejection sampling verifies chains)."""
        if self.draft.tree <= 0 or draft.alternatives is None or not self.target.takes_trees:
            return False
        return self.sampling.greedy or self.draft.verify == "point-mass"

    def _plan_tree(self, request: RequestState, draft: Draft, step: "Step") -> "Step":
        """A step that verifies a draft tree grown from the drafter's alternatives (draft_tree.py), sized
        by the length rule's costs and calibrated acceptance (read before verification, so lossless)."""
        greedy = self.sampling.greedy
        alt_tokens, alt_probs = draft.alternatives  # [g, K] each
        g = alt_tokens.shape[0]
        values = alt_probs.double()
        if self.policy is not None:  # each slot's calibrated acceptance over the drafter's own confidence
            confidence = draft.confidence if draft.confidence is not None else alt_probs[:, 0]
            scale = self.policy.acceptance(confidence, g, greedy) / confidence[:g].double().clamp(min=1e-6)
            values = (values * scale[:, None]).clamp(max=1.0)
        tree = best_first(alt_tokens, values, limit=self.draft.tree)
        lookup = lookup_continuation(request.tokens, g, MAX_NGRAM, 1) if self.draft.lookup else []
        if lookup:  # the n-gram lookup's continuation as one more branch, valued by its own calibration
            rates = self.policy.acceptance(None, len(lookup), greedy, "lookup") if self.policy is not None \
                else torch.full((len(lookup),), NO_CONFIDENCE, dtype=torch.float64)
            tree = with_branch(tree, lookup, torch.cumprod(rates, dim=0).tolist())
        if self.policy is not None:
            tree = tree.prefix(min(best_size(tree, step.costs, step.drafted), step.room))
        else:
            tree = tree.prefix(min(self.draft.tree, step.room))
        step.full_draft, step.tree, step.lookup = draft, tree, lookup
        tokens = torch.tensor([request.tokens[-1], *tree.tokens], dtype=torch.long)  # [1 + nodes]
        step.part = SequenceRows(request.target, tokens, Rows.tree(tree.rows()))
        step.tock = time.perf_counter()
        request.stats.draft_s += step.tock - step.tick
        return step

    def _conclude_tree(self, request: RequestState, step: "Step", out: TargetOutput) -> tuple[Verdict, torch.Tensor]:
        """Verify a tree step: the verdict, and the logits rows along its accepted path."""
        greedy, tree, draft, rows = self.sampling.greedy, step.tree, step.full_draft, step.part.rows
        tokens, parents = step.part.ids, list(tree.rows())
        logits = out.logits[0].float().cpu()  # [1 + nodes, V]
        if greedy:
            verdict = verify_tree_greedy(tokens, parents, logits)
        else:
            verdict = verify_tree_point_mass(tokens, parents, logits_to_probs(logits, self.sampling), None,
                                             request.uniforms(max(rows.depth) + 1))
        path = list(verdict.path)
        self.target.commit_path(request.target, step.start, path)
        if self.policy is not None:  # the calibration learns from the chain of best tokens inside the tree
            chain = top_chain(tree, draft.alternatives[0])
            self.policy.observe(draft.confidence, len(chain), followed(chain, path), greedy)
            if step.lookup:  # and the lookup's calibration from its branch
                branch = branch_nodes(tree, step.lookup)
                self.policy.observe(None, len(branch), followed(branch, path), greedy, "lookup")
            request.drafting.observe(len(tree), verdict.num_accepted, step.costs, proposed=step.drafted)
        if out.taps is not None:
            request.unread_taps.append(out.taps[:, path])
        return verdict, out.logits[0][path]

    def _verify(self, draft: Draft, target_logits: torch.Tensor, request: RequestState) -> Verdict:
        """target_logits: [g+1, V]. Verification runs on the CPU, where the drafts and the generator are.
        Point-mass matching draws with the positions' own uniforms (same seed, same tokens as plain
        decoding); rejection sampling with the request's generator."""
        generator = request.generator
        target_logits = target_logits.float().cpu()
        if self.sampling.greedy:
            return verify_greedy(draft.tokens, target_logits)
        target_probs = logits_to_probs(target_logits, self.sampling)  # [g+1, V]
        mode = self.draft.verify
        if mode == "auto" or draft.tokens.numel() == 0:  # an empty draft: just sample from p
            mode = "rejection" if draft.probs is not None and draft.tokens.numel() else "point-mass"
        if mode == "rejection":
            if draft.probs is None:
                raise DiffdraftError(
                    f"the {self.drafter.name} drafter states no exact q, so rejection sampling cannot verify it: "
                    "use verify=point-mass or auto"
                )
            return verify_rejection(draft.tokens, draft.probs, target_probs, generator)
        return verify_point_mass(draft.tokens, target_probs, None, request.uniforms(draft.tokens.numel() + 1))
