"""Target backends, and build_target(): the right one for a loaded model and weight choice.

`auto` takes the lean runtime wherever it can run the model (the Llama family) and the HF
backend otherwise; `lean` refuses a model it cannot run; `hf` always works.

Weights (docs/native-weights.md), for the lean runtime's decoder linears:
  native   the GGUF file's own 4-bit blocks through the int4 kernel (other types dequantized;
           long prefills on a bfloat16 copy where oneDNN runs bfloat16);
  int4     the float weights rounded to 4-bit groups of 32 (any Llama model);
  float32  the weights as loaded, the reference;
  auto     native for a GGUF target on the CPU's lean runtime, float32 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

from diffdraft.backends.hf import HFTarget
from diffdraft.backends.lean import BULK_ROWS, LeanLlamaTarget, lean_unsupported
from diffdraft.errors import DiffdraftError
from diffdraft.target import TargetBackend

BACKENDS = ("auto", "lean", "hf")
WEIGHTS = ("auto", "native", "int4", "float32")

__all__ = ["BACKENDS", "WEIGHTS", "HFTarget", "LeanLlamaTarget", "build_target", "int4_layers", "lean_unsupported",
           "resolve_weights"]


def resolve_weights(weights: str, backend: str, module: nn.Module, gguf: Path | None) -> str:
    """The weight choice made concrete (native, int4 or float32) for this model and backend, or a one-line
    refusal of a choice that cannot run."""
    if weights not in WEIGHTS:
        raise DiffdraftError(f"weights must be one of {', '.join(WEIGHTS)}, got {weights!r}")
    lean_reason = lean_unsupported(module) if backend != "hf" else "the HF backend runs the loaded module as it is"
    on_cpu = module.get_output_embeddings().weight.device.type == "cpu"
    float32 = module.get_output_embeddings().weight.dtype == torch.float32
    if weights == "auto":
        return "native" if gguf is not None and lean_reason is None and on_cpu and float32 else "float32"
    if weights == "float32":
        return weights
    if lean_reason:
        raise DiffdraftError(f"--weights {weights} runs on the lean runtime, and {lean_reason}")
    if not on_cpu:
        raise DiffdraftError(f"--weights {weights} runs the int4 CPU kernel; the model is on {module.device}")
    if not float32:
        raise DiffdraftError(f"--weights {weights} keeps the residual stream in float32: load with --dtype float32")
    if weights == "native" and gguf is None:
        raise DiffdraftError("--weights native reads a GGUF file's 4-bit blocks, and this model is not a GGUF file: "
                             "use --weights int4 to round its float weights to 4-bit groups of 32")
    return weights


def build_target(
    module: nn.Module, tokenizer, backend: str = "auto", tap_layers: tuple[int, ...] | None = None,
    name: str = "model", weights: str = "float32", gguf: Path | None = None, report=None, bulk_prefill: bool = True,
    fused: bool = True,
) -> TargetBackend:
    """A backend over a loaded HF causal LM (read from `gguf` when it came from one); tap layers are fixed
    here, for the life of the backend. `report` (a function of one line; default stderr) hears which path
    each GGUF tensor type took when the weights are 4-bit. bulk_prefill=False keeps long prefills of 4-bit
    weights on the 4-bit kernel (LeanLlamaTarget), for comparison."""
    if backend not in BACKENDS:
        raise DiffdraftError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    weights = resolve_weights(weights, backend, module, gguf)
    if backend == "hf" or (backend == "auto" and lean_unsupported(module)):
        target = HFTarget(module, tokenizer, tap_layers=tap_layers, name=name)
        if backend == "auto":
            target.note = f"not the lean runtime: {lean_unsupported(module)}"
        return target
    if weights == "float32":
        return LeanLlamaTarget(module, tokenizer, tap_layers=tap_layers, name=name, weights=weights)
    layers, told = int4_layers(module, weights, gguf)
    target = LeanLlamaTarget(module, tokenizer, tap_layers=tap_layers, name=name, int4_layers=layers,
                             weights=weights, bulk_prefill=bulk_prefill, fused=fused)
    if target.fused_note:
        told += f"; {target.fused_note}"
    told += "; LM head float16 (FBGEMM)" if target.half_head else "; LM head float32"
    if target.bulk_prefill:
        told += f"; prefills of {BULK_ROWS}+ tokens on a bfloat16 copy (oneDNN)"
    (report or _to_stderr)(told)
    return target


def int4_layers(module: nn.Module, weights: str, gguf: Path | None) -> tuple[list[dict], str]:
    """The decoder's 4-bit weights, per layer by LINEARS key, and a line saying where they came from."""
    from diffdraft.backends.gguf_llama import MODULE_PATHS, read_native_linears
    from diffdraft.backends.int4 import round_to_nearest

    config = module.config
    if weights == "native":
        from diffdraft.loading import cache_dir, gguf_cache_name

        native = read_native_linears(gguf, config.num_hidden_layers, config.num_attention_heads,
                                     config.num_key_value_heads,
                                     cache=cache_dir() / "int4" / f"{gguf_cache_name(Path(gguf))}.safetensors")
        return native.layers, f"weights: native from {Path(gguf).name}: {native.summary()}"
    layers = [{key: round_to_nearest(layer.get_submodule(path).weight) for key, path in MODULE_PATHS.items()}
              for layer in module.model.layers]
    return layers, (f"weights: int4, the float decoder linears rounded to 4-bit groups of 32 ({7 * len(layers)} "
                    "tensors)")


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr)
