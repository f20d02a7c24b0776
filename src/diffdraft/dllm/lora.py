"""Low-rank adapters (LoRA) for the linear projections of a Llama decoder.

An adapter adds (alpha / rank) * B(A x) to a frozen projection W x. B starts at zero, so a
fresh set of adapters leaves the base model unchanged. The adapters live in their own
module, keyed by layer and projection name; the base model is never modified or wrapped,
so one HF model can serve the plain AR target and a converted dLLM at the same time.
This module knows nothing about masks, blocks or decoding.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from diffdraft.errors import DiffdraftError

# Projection name -> (submodule of the decoder layer, attribute), the Llama layout.
PROJECTIONS = {
    "q": ("self_attn", "q_proj"),
    "k": ("self_attn", "k_proj"),
    "v": ("self_attn", "v_proj"),
    "o": ("self_attn", "o_proj"),
    "gate": ("mlp", "gate_proj"),
    "up": ("mlp", "up_proj"),
    "down": ("mlp", "down_proj"),
}


def base_linear(layer: nn.Module, name: str) -> nn.Linear:
    """The frozen projection `name` (a key of PROJECTIONS) of one HF decoder layer."""
    owner, attr = PROJECTIONS[name]
    return getattr(getattr(layer, owner), attr)


class LoraAdapters(nn.Module):
    """A (rank x in) and B (out x rank) per adapted projection of each of `num_layers` layers."""

    def __init__(self, layers: list[nn.Module], targets: tuple[str, ...], rank: int, alpha: float):
        super().__init__()
        unknown = [t for t in targets if t not in PROJECTIONS]
        if unknown:
            raise DiffdraftError(f"unknown LoRA targets {unknown}; choose from {', '.join(PROJECTIONS)}")
        if rank < 1:
            raise DiffdraftError(f"LoRA rank must be >= 1, got {rank}")
        self.targets = tuple(targets)
        self.rank = rank
        self.scale = alpha / rank
        self.a = nn.ParameterDict()
        self.b = nn.ParameterDict()
        for index, layer in enumerate(layers):
            for name in self.targets:
                linear = base_linear(layer, name)
                key = self.key(index, name)
                self.a[key] = nn.Parameter(torch.zeros(rank, linear.in_features))
                self.b[key] = nn.Parameter(torch.zeros(linear.out_features, rank))

    @staticmethod
    def key(layer: int, name: str) -> str:
        return f"{layer}_{name}"

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        """A ~ N(0, 1/in), B = 0: the adapted model starts equal to the base model.

        A is drawn where the generator lives and then copied, so a CPU generator also
        initialises adapters on a GPU, and a seed gives the same A on every device.
        """
        with torch.no_grad():
            for key, a in self.a.items():
                device = generator.device if generator is not None else a.device
                draw = torch.randn(a.shape, generator=generator, device=device)  # [rank, in]
                a.copy_(draw / math.sqrt(a.shape[1]))
                self.b[key].zero_()

    def factors(self, layer_index: int, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This projection's update as (A [rank, in], (alpha / rank) * B [out, rank]), or None where it has
        none: x A^T B'^T is what apply() adds."""
        key = self.key(layer_index, name)
        if key not in self.a:
            return None
        return self.a[key].detach(), self.scale * self.b[key].detach()

    def apply(self, layer_index: int, name: str, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """linear(x) plus this projection's low-rank update. x: [..., in] -> [..., out]."""
        out = linear(x)
        key = self.key(layer_index, name)
        if key not in self.a:
            return out
        a, b = self.a[key], self.b[key]
        low = x.to(a.dtype) @ a.t()  # [..., rank]
        return out + (self.scale * (low @ b.t())).to(out.dtype)
