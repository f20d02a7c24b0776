"""From command-line choices to models: the dLLM target and its drafter over a loaded Target.

The target (`--dllm SPEC`):
  FOLDER   a converted dLLM written by `diffdraft dllm-train` (checkpoint.load_dllm)
  b4, b8   the SmolLM2 conversion shipped in the package (checkpoint.shipped_folder)
  base     the unconverted model with zero-update adapters and a fresh mask embedding
           (the mean token embedding): untrained, so its text is poor; it exercises the path
The drafter (`--dllm-drafter SPEC` or `--dllm-drafter-layers N`, at most one):
  FOLDER   a dLLM drafter written by `diffdraft dllm-train --layers N`
  b4, b8   the shipped SmolLM2 drafter for that block size
  N layers the target's own first N layers (its adapters and mask embedding up to layer
           N, then the final norm and LM head), untrained as a drafter
`dllm_runners` builds both ways of decoding over one target: its own, and SimSD when a
drafter is given, on one runtime (`dllm_runtime`: the lean runtime wherever it runs the
model, the module with --backend hf). Every refusal is one DiffdraftError line, raised
before any decoding.
Knows nothing of text, prompt suites or reports.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from diffdraft.dllm.checkpoint import load_dllm, shipped_folder
from diffdraft.dllm.drafter import DLLMDrafter
from diffdraft.dllm.model import BlockDiffusionLM, DLLMConfig
from diffdraft.dllm.runner import DLLMRunner
from diffdraft.dllm.runtime import blocks_for
from diffdraft.errors import DiffdraftError

BASE = "base"
SHIPPED = {"b4": 4, "b8": 8}
DEFAULT_BLOCK_SIZE = 4


def _folder(spec: str, drafter: bool) -> Path:
    """The checkpoint folder a spec names (shipped name or path), refused when absent."""
    what = "dLLM drafter" if drafter else "converted dLLM"
    if spec in SHIPPED:
        folder = shipped_folder(SHIPPED[spec], drafter)
        if not (folder / "drafter.json").is_file():
            raise DiffdraftError(f"no shipped {what} for blocks of {SHIPPED[spec]} at {folder}: its weights are "
                                 f"made by scripts/cpu_dllm.sh (or on a GPU, scripts/gpu_lanes.sh lanes 4 and 5) and "
                                 f"installed by scripts/gpu_lanes.sh install (or pass a folder, or '--dllm base')")
        return folder
    folder = Path(spec)
    if not folder.is_dir():
        raise DiffdraftError(f"no {what} folder at {spec} (give a folder written by `diffdraft dllm-train`, "
                             f"{' or '.join(SHIPPED)}{'' if drafter else ', or base'})")
    return folder


def check_choices(spec: str, drafter: str | None, layers: int | None, block_size: int | None) -> None:
    """The checks that need no model (folders exist, one drafter choice, a valid block size): run before loading."""
    if block_size is not None:
        DLLMConfig(block_size=block_size)  # validates it
    if spec != BASE:
        _folder(spec, drafter=False)
    if drafter is not None and layers is not None:
        raise DiffdraftError("give a dLLM drafter folder or a drafter layer count, not both")
    if drafter is not None:
        _folder(drafter, drafter=True)


def dllm_target(spec: str, target, block_size: int | None = None, seed: int = 0) -> BlockDiffusionLM:
    """The block-diffusion target over target.module (a diffdraft target backend); see the module docstring."""
    check_choices(spec, None, None, block_size)
    depth = target.num_layers
    if spec == BASE:
        net = BlockDiffusionLM(target.module, DLLMConfig(block_size=block_size or DEFAULT_BLOCK_SIZE))
        net.reset_parameters(torch.Generator().manual_seed(seed))
        return net.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
    folder = _folder(spec, drafter=False)
    net = load_dllm(folder, target)
    if net.num_layers != depth:
        raise DiffdraftError(f"{folder} holds a {net.num_layers}-layer dLLM drafter, not a converted target of "
                             f"{depth} layers: pass it as --dllm-drafter")
    if block_size is not None and block_size != net.block_size:
        raise DiffdraftError(f"the dLLM in {folder} decodes blocks of {net.block_size}, not {block_size}")
    return net


def dllm_drafter(spec: str | None, layers: int | None, target, net: BlockDiffusionLM) -> DLLMDrafter | None:
    """The drafter for `net` (the dLLM target over `target`), or None when neither choice is given."""
    check_choices(BASE, spec, layers, None)
    if spec is None and layers is None:
        return None
    if layers is not None:
        if isinstance(layers, bool) or not isinstance(layers, int) or not 1 <= layers <= target.num_layers:
            raise DiffdraftError(f"dLLM drafter layers must be in 1..{target.num_layers}, got {layers!r}")
        small = BlockDiffusionLM(target.module, dataclasses.replace(net.config, num_layers=layers))
        own = net.state_dict()
        small.load_state_dict({name: own[name] for name in small.state_dict()})  # the target's first layers
        small = small.to(device=target.device, dtype=target.dtype).eval().requires_grad_(False)
        drafter = DLLMDrafter(small)
    else:
        drafter = DLLMDrafter(load_dllm(_folder(spec, drafter=True), target))
    drafter.check_compatible(net)
    return drafter


def dllm_runtime(backend: str, module) -> str:
    """The dLLM target's runtime for a --backend choice: `hf` runs the module, `lean` the lean runtime (refused
    in one line where it cannot run the model), `auto` the lean runtime wherever it can."""
    from diffdraft.backends import BACKENDS, lean_unsupported

    if backend not in BACKENDS:
        raise DiffdraftError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "hf":
        return "module"
    reason = lean_unsupported(module)
    if reason and backend == "lean":
        raise DiffdraftError(f"the lean runtime cannot run this dLLM: {reason}; use --backend hf")
    return "module" if reason else "lean"


def dllm_runners(target, spec: str, drafter: str | None = None, layers: int | None = None,
                 block_size: int | None = None, steps: int | None = None,
                 verify: str = "auto", runtime: str = "module", gguf=None) -> tuple[DLLMRunner, DLLMRunner | None]:
    """The dLLM's own decoding and, when a drafter is chosen, SimSD: both over one converted target, whose
    forwards run on `runtime` (module or lean; runtime.py; `gguf`: the file the target came from)."""
    check_choices(spec, drafter, layers, block_size)
    net = dllm_target(spec, target, block_size=block_size)
    blocks = blocks_for(net, runtime, target.tokenizer, gguf)
    label = "dllm-base" if spec == BASE else "dllm"
    own = DLLMRunner(blocks, None, steps=steps, eos_ids=target.eos_token_ids, label=label)
    small = dllm_drafter(drafter, layers, target, net)
    if small is None:
        return own, None
    return own, DLLMRunner(blocks, small, steps=steps, eos_ids=target.eos_token_ids, verify=verify, label=label)
