"""Target backends, and build_target(): the right one for a loaded model.

`auto` takes the lean runtime wherever it can run the model (the Llama family) and the HF
backend otherwise; `lean` refuses a model it cannot run; `hf` always works.
"""

from __future__ import annotations

from torch import nn

from diffdraft.backends.hf import HFTarget
from diffdraft.backends.lean import LeanLlamaTarget, lean_unsupported
from diffdraft.errors import DiffdraftError
from diffdraft.target import TargetBackend

BACKENDS = ("auto", "lean", "hf")

__all__ = ["BACKENDS", "HFTarget", "LeanLlamaTarget", "build_target", "lean_unsupported"]


def build_target(
    module: nn.Module, tokenizer, backend: str = "auto", tap_layers: tuple[int, ...] | None = None, name: str = "model"
) -> TargetBackend:
    """A backend over a loaded HF causal LM; tap layers are fixed here, for the life of the backend."""
    if backend not in BACKENDS:
        raise DiffdraftError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "hf" or (backend == "auto" and lean_unsupported(module)):
        return HFTarget(module, tokenizer, tap_layers=tap_layers, name=name)
    return LeanLlamaTarget(module, tokenizer, tap_layers=tap_layers, name=name)
