"""Linear layers whose weights are prepared once for the fastest row-invariant kernel.

On a CPU in float32 a weight is reordered once into oneDNN's blocked layout and every call
goes through oneDNN's linear. Measured on the 2-core development CPU (DESIGN.md section 3)
that is 1.6x faster than `F.linear` (MKL) for one row and 2x for 16, and, what matters more,
each output row is bit-identical whatever the number of rows in the call, so a forward over
k tokens computes exactly what k one-token forwards compute. `F.linear` has no such property.
Elsewhere (CUDA, or when oneDNN is missing) the weight is kept as it is and `F.linear` runs.
`row_invariant` says which of the two a layer got. This module knows nothing of models.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn


def onednn_ready(weight: torch.Tensor) -> bool:
    """True where the reordered oneDNN linear can serve `weight`: on the CPU, float32 or bfloat16."""
    return (
        weight.device.type == "cpu"
        and weight.dtype in (torch.float32, torch.bfloat16)
        and torch.backends.mkldnn.is_available()
    )


# oneDNN's rows stay invariant for reductions up to 1,024 inputs on the development CPU and not at
# 1,536 (SmolLM2's down projection): longer reductions are cut into equal chunks of at most this
# many inputs, whose partial results are added in a fixed order, row by row.
MAX_CHUNK = 768


class PreparedLinear:
    """y = x W^T (+ b) with W prepared once. x: [..., in] -> [..., out]. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prefer_onednn: bool = True):
        weight = weight.detach().contiguous()  # [out, in]
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self.row_invariant = prefer_onednn and onednn_ready(weight)
        if self.row_invariant:
            chunks = -(-self.in_features // MAX_CHUNK)
            self.splits = [len(part) for part in torch.arange(self.in_features).tensor_split(chunks)]
            self.parts = [torch.ops.mkldnn._reorder_linear_weight(part.contiguous(), None)
                          for part in weight.split(self.splits, dim=1)]
        else:
            self.weight = weight

    @staticmethod
    def fused(weights: list[torch.Tensor], prefer_onednn: bool = True) -> "PreparedLinear":
        """One linear over several weights stacked on the output side (q/k/v, gate/up): one call, not many."""
        return PreparedLinear(torch.cat([w.detach() for w in weights], dim=0), prefer_onednn=prefer_onednn)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.row_invariant:
            return F.linear(x, self.weight, self.bias)
        pieces = x.split(self.splits, dim=-1) if len(self.parts) > 1 else (x,)
        y = torch.ops.mkldnn._linear_pointwise(pieces[0], self.parts[0], self.bias, "none", [], "")
        for piece, part in zip(pieces[1:], self.parts[1:]):
            y = y + torch.ops.mkldnn._linear_pointwise(piece, part, None, "none", [], "")
        return y


class PreparedLinearModule(nn.Module):
    """A drop-in for an inference-only nn.Linear that runs through a PreparedLinear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = PreparedLinear(linear.weight, linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


def prepared_copy(module: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """An inference-only copy of a network on `device` in `dtype`, whose every nn.Linear runs
    through a PreparedLinear. The original is left as it was (a trainer may still be training it)."""
    prepared = copy.deepcopy(module).to(device=device, dtype=dtype).eval().requires_grad_(False)
    for parent in list(prepared.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PreparedLinearModule(child))
    return prepared
