"""A converted block-diffusion model on disk: adapters + mask embedding, never the base weights.

The folder holds drafter.json (kind "dllm", the DLLMConfig, the signature of the base
model it was trained on, training facts) and drafter.safetensors (the LoRA matrices and
the mask embedding), written atomically by drafters.checkpoint. A SmolLM2 conversion at
rank 8 on every projection is about 2.4 M parameters, under 5 MB in bf16. Loading
refuses, with one DiffdraftError line, a damaged folder, another kind of checkpoint, a
base model of another shape or tokenizer, and tensors that do not fit the config.
Knows nothing about training or decoding.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffdraft.dllm.model import BlockDiffusionLM, DLLMConfig
from diffdraft.drafters.block_diffusion import target_signature
from diffdraft.drafters.checkpoint import read_checkpoint, write_checkpoint
from diffdraft.errors import DiffdraftError

KIND = "dllm"
FORMAT = 2  # 2: each slot is predicted from the position before it (model.slot_hidden); 1 read its own position
WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"


def shipped_folder(block_size: int, drafter: bool = False) -> Path:
    """Where the SmolLM2 conversion for blocks of `block_size` (or its drafter) ships in the package."""
    return WEIGHTS_DIR / f"smollm2-dllm-b{block_size}{'-drafter' if drafter else ''}"


def save_dllm(folder: str | Path, net: BlockDiffusionLM, signature: dict, extra: dict | None = None,
              dtype: torch.dtype = torch.float32) -> None:
    """Write the adapters and mask embedding of `net`; `signature` is target_signature of its base."""
    config = {"kind": KIND, "format": FORMAT, "dllm": net.config.to_dict(), "base": signature}
    if extra:
        config["training"] = extra
    write_checkpoint(folder, config, dict(net.state_dict()), dtype=dtype)


def check_kind_and_format(config: dict, folder: str | Path) -> None:
    """Refuse a checkpoint config that is not a converted dLLM this diffdraft reads."""
    if config.get("kind") != KIND:
        raise DiffdraftError(f"{folder} holds a {config.get('kind')!r} checkpoint, not a converted dLLM")
    if config.get("format", 1) != FORMAT:
        raise DiffdraftError(f"{folder} holds a dLLM of format {config.get('format', 1)}, this diffdraft reads format "
                             f"{FORMAT} (each slot predicted from the position before it): convert it again")


def load_dllm(folder: str | Path, target) -> BlockDiffusionLM:
    """A BlockDiffusionLM over target.module (a diffdraft target backend) from a folder written by save_dllm."""
    config, tensors = read_checkpoint(folder)
    check_kind_and_format(config, folder)
    try:
        dllm = DLLMConfig.from_dict(config["dllm"])
        signature = dict(config["base"])
    except (KeyError, TypeError, ValueError) as err:
        raise DiffdraftError(f"dLLM config in {folder} is damaged: {type(err).__name__}: {err}") from err
    theirs = target_signature(target)
    for key, what in (("hidden_size", "width"), ("vocab_size", "vocabulary size"), ("num_layers", "layer count"),
                      ("tokenizer", "tokenizer")):
        if signature.get(key) != theirs[key]:
            raise DiffdraftError(f"dLLM in {folder} was converted from another model: its {what} "
                                 f"{signature.get(key)} differs from this model's {theirs[key]}")
    net = BlockDiffusionLM(target.module, dllm)
    try:
        net.load_state_dict(tensors)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        raise DiffdraftError(f"dLLM weights in {folder} do not fit its config: {' '.join(first[:2])}") from err
    bad = [name for name, value in tensors.items() if value.is_floating_point() and not torch.isfinite(value).all()]
    if bad:
        raise DiffdraftError(f"dLLM weights in {folder} hold non-finite values ({bad[0]})")
    return net.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
