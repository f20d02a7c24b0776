"""Early-exit self drafter: the target's first n layers plus a small head of its own.

It drafts autoregressively with its own KV cache (one per sequence, in its state), sharing
the target's weights (nothing is copied). Its head is a D x D linear map (identity at start,
so untrained it is plain early exit) followed by the target's final norm and LM head. Every
token is drawn from logits_to_probs of its logits, so its q is exact and rejection sampling
applies.
Only decoder-only models whose body is `model.model` with `layers`, `norm` and a config
`num_hidden_layers` (the Llama family and most HF causal LMs) are supported.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from diffdraft.config import SamplingConfig
from diffdraft.drafters.base import Draft, Drafter
from diffdraft.drafters.checkpoint import read_checkpoint, write_checkpoint
from diffdraft.errors import DiffdraftError
from diffdraft.sampling import logits_to_probs, sample

@dataclass
class EarlyExitState:
    cache: DynamicCache  # the drafter's own layers' keys and values of `cached`
    cached: list[int] = field(default_factory=list)  # the tokens whose keys and values are in the cache


class EarlyExitDrafter(Drafter):
    name = "early-exit"
    states_q = True  # each Draft carries the early-exit law q

    def __init__(self, target, num_layers: int = 4, head: nn.Linear | None = None):
        body = getattr(target.module, "model", None)
        if body is None or not hasattr(body, "layers") or not hasattr(body, "norm"):
            raise DiffdraftError("the early-exit drafter needs a decoder-only model with model.layers and model.norm")
        if not 1 <= num_layers < target.num_layers:
            raise DiffdraftError(
                f"early-exit layers must be in 1..{target.num_layers - 1} for this target, got {num_layers}"
            )
        self.target = target
        self.num_layers = num_layers
        # A shallow copy of the target body that runs only the first num_layers layers and
        # skips the final norm (the head applies it after its own map). Weights are shared.
        self._body = copy.copy(body)
        self._body._modules = dict(body._modules)
        self._body.config = copy.copy(body.config)
        self._body.config.num_hidden_layers = num_layers
        self._body.norm = nn.Identity()
        self._final_norm = body.norm
        width = target.hidden_size
        if head is None:
            head = nn.Linear(width, width, dtype=target.dtype, device=target.device)
            with torch.no_grad():
                head.weight.copy_(torch.eye(width))
                head.bias.zero_()
        self.head = head
        self.check_compatible(target)

    def check_compatible(self, target) -> None:
        if self.head.in_features != target.hidden_size or self.head.out_features != target.hidden_size:
            raise DiffdraftError(
                f"drafter width {self.head.in_features} does not fit the target width {target.hidden_size}"
            )

    def new_state(self) -> EarlyExitState:
        return EarlyExitState(cache=DynamicCache(config=self._body.config))

    def begin(self, state: EarlyExitState, prompt: list[int], taps: torch.Tensor | None) -> None:
        state.cache, state.cached = DynamicCache(config=self._body.config), []

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [B, k, D] after num_layers layers -> logits [B, k, V]."""
        return self.target.lm_head(self._final_norm(self.head(hidden)))

    def _forward(self, state: EarlyExitState, new_tokens: list[int]) -> torch.Tensor:
        """Append tokens to the sequence's drafter cache; returns logits of the last one, [V]."""
        ids = torch.tensor([new_tokens], dtype=torch.long, device=self.target.device)  # [1, k]
        hidden = self._body(input_ids=ids, past_key_values=state.cache, use_cache=True).last_hidden_state
        state.cached.extend(new_tokens)
        return self.logits(hidden[:, -1:])[0, 0]

    @torch.inference_mode()
    def propose(
        self, state: EarlyExitState, tokens: list[int], num_tokens: int, sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        # Roll the cache back to the longest prefix it shares with `tokens`, keeping at least
        # one token to feed so that we get logits for the next position.
        keep = 0
        limit = min(len(state.cached), len(tokens) - 1)
        while keep < limit and state.cached[keep] == tokens[keep]:
            keep += 1
        if keep < len(state.cached):
            state.cache.crop(keep - len(state.cached))
            del state.cached[keep:]
        logits = self._forward(state, tokens[keep:])  # [V]
        drafted, laws = [], []
        for i in range(num_tokens):
            probs = logits_to_probs(logits, sampling)  # [V]
            token = int(probs.argmax()) if sampling.greedy else int(sample(probs, generator))
            drafted.append(token)
            laws.append(probs)
            if i + 1 < num_tokens:
                logits = self._forward(state, [token])
        if not drafted:
            return Draft.empty()
        return Draft(tokens=torch.tensor(drafted, dtype=torch.long), probs=torch.stack(laws))  # [g], [g, V]

    # ----- checkpoints -----
    def save(self, folder: str | Path) -> None:
        config = {
            "kind": self.name,
            "num_layers": self.num_layers,
            "hidden_size": self.target.hidden_size,
            "vocab_size": self.target.vocab_size,
            "target_name": self.target.name,
        }
        write_checkpoint(folder, config, self.head.state_dict())

    @classmethod
    def load(cls, folder: str | Path, target) -> "EarlyExitDrafter":
        config, tensors = read_checkpoint(folder)
        for key in ("num_layers", "hidden_size", "vocab_size"):
            if not isinstance(config.get(key), int):
                raise DiffdraftError(f"drafter config in {folder} lacks an integer {key!r}")
        for key, what, theirs in (("hidden_size", "width", target.hidden_size),
                                  ("vocab_size", "vocabulary", target.vocab_size)):
            if config[key] != theirs:
                trained = config.get("target_name") or "another target"
                raise DiffdraftError(
                    f"drafter in {folder} does not fit the target {target.name}: it was trained for {trained} "
                    f"(width {config['hidden_size']}, vocabulary {config['vocab_size']}); the target has {what} {theirs}"
                )
        width = config["hidden_size"]
        head = nn.Linear(width, width, dtype=target.dtype, device=target.device)
        try:
            head.load_state_dict({k: v.to(target.dtype) for k, v in tensors.items()})
        except RuntimeError as err:
            raise DiffdraftError(f"drafter weights in {folder} do not match its config: {err}") from err
        return cls(target, num_layers=config["num_layers"], head=head)
