"""Drafters, and build_drafter(): a drafter by name or from a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from diffdraft.drafters.base import Draft, Drafter
from diffdraft.drafters.block_diffusion import BlockDiffusionDrafter
from diffdraft.drafters.checkpoint import is_checkpoint, read_config
from diffdraft.drafters.early_exit import EarlyExitDrafter
from diffdraft.drafters.ngram import NgramDrafter
from diffdraft.errors import DiffdraftError

DRAFTER_NAMES = ("none", "ngram", "early-exit", "block-diffusion")
# The block-diffusion drafter trained for the default target, shipped in the package.
SHIPPED_DRAFTER = Path(__file__).resolve().parent.parent / "weights" / "smollm2-bd16"

__all__ = ["Draft", "Drafter", "BlockDiffusionDrafter", "EarlyExitDrafter", "NgramDrafter", "DRAFTER_NAMES", "build_drafter"]


def build_drafter(spec: str, target, early_exit_layers: int = 4) -> Drafter | None:
    """A drafter by name (none, ngram, early-exit, block-diffusion) or a drafter checkpoint folder.

    "none" returns None: plain decoding. The drafter is checked against the target.
    """
    if spec == "none":
        return None
    if spec == "ngram":
        return NgramDrafter()
    if spec == "early-exit":
        return EarlyExitDrafter(target, num_layers=early_exit_layers)
    if spec == "block-diffusion":
        return BlockDiffusionDrafter.load(SHIPPED_DRAFTER, target)
    if Path(spec).is_dir():
        if not is_checkpoint(spec):
            raise DiffdraftError(f"{spec} is not a drafter folder (no drafter.json)")
        kind = read_config(spec)["kind"]
        if kind == EarlyExitDrafter.name:
            return EarlyExitDrafter.load(spec, target)
        if kind == BlockDiffusionDrafter.name:
            return BlockDiffusionDrafter.load(spec, target)
        raise DiffdraftError(f"drafter in {spec} is of unknown kind {kind!r}")
    raise DiffdraftError(f"unknown drafter {spec!r}: use one of {', '.join(DRAFTER_NAMES)} or a drafter folder")
