"""The standalone masked-diffusion drafter at decode time (no target features).

Wraps MaskedDiffusionNet with the target's frozen embedding and LM head. It keeps its own
causal cache of the committed tokens before the last one, one per sequence in its state
(synchronised from the token list it is handed, so it never needs the target's help), and
drafts a block [last token, MASK x (g-1)] in T denoising steps: each step predicts every
masked slot and reveals the next share of them, either left to right or by confidence
(highest drafter probability first).

Exact q: a slot's token is drawn from the slot's distribution at the step it is revealed.
Left to right, that distribution depends only on tokens to its left, so it is the exact
law of the token given the earlier draft tokens and rejection sampling applies; T = 1 is
the same case. Confidence order (T > 1) can condition a slot on tokens to its right, so the
draft carries no q and verification falls back to point-mass matching (lossless for any
drafter).
Multi-draft self-selection: with several candidates (different step counts, or several
samples), the block with the highest expected accepted length under the drafter's own
probabilities is proposed: one target forward still verifies it. Choosing among drafts
changes their law, so a selected draft also carries no q.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from diffdraft.config import SamplingConfig
from diffdraft.drafters.base import Draft
from diffdraft.drafters.block_diffusion import SIGNATURE_CHECKS, check_signature, target_signature
from diffdraft.drafters.checkpoint import read_checkpoint, write_checkpoint
from diffdraft.drafters.draft_head import DRAFT_VOCAB_KEY, DraftHead, HeadedDrafter, add_draft_vocab
from diffdraft.errors import DiffdraftError
from diffdraft.expected_length import log_expected_accepted_length
from diffdraft.models.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionNet
from diffdraft.sampling import logits_to_probs, sample

KIND = "masked-diffusion"
ORDERS = ("left-to-right", "confidence")


@dataclass(frozen=True)
class DenoiseConfig:
    """How a block is denoised: steps T, reveal order, and the candidates to select among."""

    steps: int = 1
    order: str = "left-to-right"
    candidates: tuple[int, ...] = ()  # step counts to try and select among; () = just `steps`
    samples: int = 1  # samples per step count (only differ at temperature > 0)

    def __post_init__(self) -> None:
        if not isinstance(self.steps, int) or self.steps < 1:
            raise DiffdraftError(f"denoising steps must be an integer >= 1, got {self.steps!r}")
        if self.order not in ORDERS:
            raise DiffdraftError(f"reveal order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if any(not isinstance(t, int) or t < 1 for t in self.candidates):
            raise DiffdraftError(f"candidate step counts must be integers >= 1, got {self.candidates!r}")
        if not isinstance(self.samples, int) or self.samples < 1:
            raise DiffdraftError(f"samples per candidate must be an integer >= 1, got {self.samples!r}")

    @property
    def step_counts(self) -> tuple[int, ...]:
        return self.candidates or (self.steps,)

    @property
    def selects(self) -> bool:
        return len(self.step_counts) * self.samples > 1


def reveal_counts(num_slots: int, steps: int) -> list[int]:
    """How many slots each of `steps` steps reveals: near-equal shares, earlier steps larger, none empty."""
    steps = min(steps, num_slots)
    base, extra = divmod(num_slots, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


@dataclass
class MaskedDiffusionState:
    cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None  # per layer: keys, values [1, Hkv, n, hd] of `cached`
    cached: list[int] = field(default_factory=list)  # the committed tokens in the cache


class MaskedDiffusionDrafter(HeadedDrafter):
    name = KIND

    def __init__(self, target, net: MaskedDiffusionNet, signature: dict | None = None,
                 draft_vocab: torch.Tensor | None = None, denoise: DenoiseConfig | None = None):
        self.target = target
        self.net = net.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
        self.signature = signature or target_signature(target)
        self.denoise = denoise or DenoiseConfig()
        self.check_compatible(target)
        self.head = DraftHead(target, draft_vocab)

    def check_compatible(self, target) -> None:
        check_signature(self.signature, target, checks=SIGNATURE_CHECKS[:2])  # any depth: it reads no layers
        if self.net.cfg.hidden_size != target.hidden_size:
            raise DiffdraftError("drafter config is inconsistent: its network width does not match its target")

    # ----- the drafter's own causal cache -----
    def new_state(self) -> MaskedDiffusionState:
        return MaskedDiffusionState()

    def begin(self, state: MaskedDiffusionState, prompt: list[int], taps: torch.Tensor | None) -> None:
        state.cache, state.cached = None, []

    @torch.inference_mode()
    def _sync(self, state: MaskedDiffusionState, context: list[int]) -> None:
        """Make the cache hold exactly `context`: keep the common prefix, drop the rest, append the new tail."""
        keep = 0
        for a, b in zip(state.cached, context):
            if a != b:
                break
            keep += 1
        if keep < len(state.cached):
            state.cache = None if keep == 0 else [(k[:, :, :keep], v[:, :, :keep]) for k, v in state.cache]
            state.cached = state.cached[:keep]
        new = context[keep:]
        if not new:
            return
        device = self.target.device
        x = self.target.embed_tokens(torch.tensor([new], device=device))  # [1, m, D]
        positions = torch.arange(keep, keep + len(new), device=device)[None]  # [1, m]
        m = len(new)
        mask = torch.ones(m, keep + m, dtype=torch.bool, device=device)
        mask[:, keep:] = torch.ones(m, m, dtype=torch.bool, device=device).tril()
        _, new_kv = self.net(x, positions, state.cache, mask[None, None])
        if state.cache is None:
            state.cache = new_kv
        else:
            state.cache = [(torch.cat([k, nk], dim=2), torch.cat([v, nv], dim=2))
                           for (k, v), (nk, nv) in zip(state.cache, new_kv)]
        state.cached = list(context)

    # ----- drafting -----
    def _denoise(self, state: MaskedDiffusionState, last: int, start: int, count: int, steps: int,
                 sampling: SamplingConfig, generator: torch.Generator | None,
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One block in `steps` steps.

        Returns tokens [count] (target ids), q [count, V] (each slot's sampling law when it was
        revealed), token_logp [count] (log of the drafter's own, unsharpened probability of the
        revealed token: what ranks candidates in self-selection) and sureness [count] (the top
        probability of the slot's distribution when revealed: what ranks slots in confidence
        order, and the Draft's confidence).
        """
        g, device = self.block_size, self.target.device
        ids = torch.zeros(g, dtype=torch.long, device=device)
        ids[0] = last
        masked = torch.ones(g, dtype=torch.bool, device=device)
        masked[0] = False
        positions = torch.arange(start, start + g, device=device)[None]  # [1, g]
        q = torch.zeros(count, self.target.vocab_size, device=device)
        token_logp = torch.zeros(count, device=device)
        sureness = torch.zeros(count, device=device)
        for share in reveal_counts(count, steps):
            x = self.net.block_inputs(self.target.embed_tokens(ids[None]), masked[None])  # [1, g, D]
            hidden, _ = self.net(x, positions, state.cache, None)
            open_slots = torch.nonzero(masked[1 : 1 + count]).flatten() + 1  # block indices still masked
            logits = self.head.logits(hidden[0, open_slots]).float()  # [n_open, N]
            own = logits.log_softmax(dim=-1)  # the drafter's own belief, whatever the sampling settings
            top = own.max(dim=-1).values  # [n_open]
            if self.denoise.order == "left-to-right":
                chosen = torch.arange(share, device=device)
            else:
                chosen = top.topk(share).indices
            law = logits_to_probs(logits[chosen], sampling)  # [share, N]
            picked = law.argmax(dim=-1) if sampling.greedy else sample(law, generator)  # [share]
            slots = open_slots[chosen]
            ids[slots] = self.head.to_target_ids(picked)
            masked[slots] = False
            q[slots - 1] = self.head.to_full(law)
            token_logp[slots - 1] = own[chosen].gather(1, picked[:, None]).squeeze(1)
            sureness[slots - 1] = top[chosen].exp()
        return ids[1 : 1 + count], q, token_logp, sureness

    @property
    def states_q(self) -> bool:
        """q is exact when no draft is selected among samples and each token's law was fixed by its left
        context: one denoising step, or left-to-right order."""
        return not self.denoise.selects and (self.denoise.order == "left-to-right"
                                              or all(s == 1 for s in self.denoise.step_counts))

    @torch.inference_mode()
    def propose(self, state: MaskedDiffusionState, tokens: list[int], num_tokens: int, sampling: SamplingConfig,
                generator: torch.Generator | None) -> Draft:
        count = min(num_tokens, self.block_size - 1)
        if count <= 0:
            return Draft.empty()
        self._sync(state, tokens[:-1])
        best, best_score = None, -math.inf
        for steps in self.denoise.step_counts:
            for _ in range(self.denoise.samples):
                drafted, q, token_logp, sureness = self._denoise(state, tokens[-1], len(tokens) - 1, count, steps,
                                                                 sampling, generator)
                if not self.denoise.selects:
                    exact = steps == 1 or self.denoise.order == "left-to-right" or sampling.greedy
                    return Draft(tokens=drafted.cpu(), probs=q.cpu() if exact else None, confidence=sureness.cpu())
                score = float(log_expected_accepted_length(token_logp))
                if score > best_score:
                    best, best_score = (drafted, sureness), score
        return Draft(tokens=best[0].cpu(), probs=None, confidence=best[1].cpu())

    # ----- checkpoints -----
    @classmethod
    def load(cls, folder: str | Path, target, denoise: DenoiseConfig | None = None) -> "MaskedDiffusionDrafter":
        net, signature, config, draft_vocab = load_masked_net(folder)
        if denoise is None:
            denoise = denoise_from_dict(config.get("denoise", {}))
        return cls(target, net, signature, draft_vocab=draft_vocab, denoise=denoise)


def denoise_from_dict(data: dict) -> DenoiseConfig:
    data = dict(data)
    if "candidates" in data:
        data["candidates"] = tuple(data["candidates"])
    try:
        return DenoiseConfig(**data)
    except TypeError as err:
        raise DiffdraftError(f"bad denoising settings {data}: {err}") from err


def save_masked_drafter(folder, net: MaskedDiffusionNet, signature: dict, extra: dict | None = None,
                        dtype: torch.dtype = torch.float32, draft_vocab: torch.Tensor | None = None,
                        denoise: dict | None = None, warmup: dict | None = None) -> None:
    """Write a masked-diffusion drafter folder. `warmup` ({"drafter": spec, "tokens": n}) names the
    drafter that speculates the first n tokens of each response before this one takes over."""
    config = {"kind": KIND, "net": net.cfg.to_dict(), "target": signature, "denoise": denoise or {},
              "warmup": warmup or {"drafter": "ngram", "tokens": 0}}
    if extra:
        config["training"] = extra
    tensors = dict(net.state_dict())
    add_draft_vocab(config, tensors, draft_vocab)
    write_checkpoint(folder, config, tensors, dtype=dtype)


def load_masked_net(folder) -> tuple[MaskedDiffusionNet, dict, dict, torch.Tensor | None]:
    """Read a masked-diffusion drafter folder: (net, target signature, config, draft vocab)."""
    config, tensors = read_checkpoint(folder)
    draft_vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
    if config.get("kind") != KIND:
        raise DiffdraftError(f"{folder} holds a {config.get('kind')!r} drafter, not a {KIND} one")
    try:
        net = MaskedDiffusionNet(MaskedDiffusionConfig.from_dict(config["net"]))
        net.load_state_dict(tensors)
        signature = dict(config["target"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise DiffdraftError(f"drafter in {folder} is damaged or inconsistent: {type(err).__name__}: {err}") from err
    return net, signature, config, draft_vocab
