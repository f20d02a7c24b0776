"""A Llama-family GGUF file's decoder linears as 4-bit weights, read straight from the file's blocks.

Each layer's q, k, v, o, gate, up and down projection whose GGUF type is a 4-bit group
format (Q4_0, Q4_1, Q4_K) becomes an Int4Weight without passing through float32; any other
type (Q8_0, Q6_K, F16, ...) is left to the float weights the model loaded (None here), and
`paths` says which way each GGUF type went, for the load to report. llama.cpp's converter
stores q and k with their rotary halves interleaved per head; their rows are put back in
the Hugging Face order here, as transformers does when it dequantizes. Knows nothing of
kernels or decoding; the norms, the embedding and the head come from the loaded model.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from diffdraft.backends.int4 import GGUF_INT4_KINDS, Int4Weight, from_gguf
from diffdraft.errors import DiffdraftError

# Our name for each decoder linear -> its GGUF tensor name inside blk.{i}.
LINEARS = {"q": "attn_q", "k": "attn_k", "v": "attn_v", "o": "attn_output",
           "gate": "ffn_gate", "up": "ffn_up", "down": "ffn_down"}
# The same linears inside a Hugging Face Llama decoder layer.
MODULE_PATHS = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
                "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@dataclass
class NativeLinears:
    layers: list[dict[str, Int4Weight | None]]  # per layer, by LINEARS key; None: not 4-bit in the file
    paths: dict[str, str]  # GGUF type -> what became of its tensors, e.g. "Q4_1" -> "int4 kernel (210 tensors)"

    def summary(self) -> str:
        return "; ".join(f"{kind}: {path}" for kind, path in sorted(self.paths.items()))


def unpermute_rows(rows: int, heads: int) -> torch.Tensor:
    """The row order that undoes llama.cpp's per-head interleaving of the rotary halves of q or k."""
    half = rows // heads // 2
    return torch.arange(rows).view(heads, half, 2).transpose(1, 2).reshape(rows)


def read_native_linears(path: str | Path, num_layers: int, num_heads: int, num_kv_heads: int,
                        cache: Path | None = None) -> NativeLinears:
    """The decoder linears of a Llama GGUF file (see the module docstring). Refuses a file whose layers do
    not match the loaded model's. With `cache`, a safetensors file of the result: read when it is there
    (reading the GGUF itself takes seconds, most of them in its tokenizer metadata), written when not."""
    if cache is not None:
        cached = _read_cache(cache, num_layers)
        if cached is not None:
            return cached
    native = _read_gguf(path, num_layers, num_heads, num_kv_heads)
    if cache is not None:
        _write_cache(cache, native)
    return native


def _write_cache(cache: Path, native: NativeLinears) -> None:
    from safetensors.torch import save_file

    tensors = {f"{i}.{key}.{part}": getattr(weight, part).contiguous()
               for i, layer in enumerate(native.layers) for key, weight in layer.items() if weight is not None
               for part in ("q", "scale", "zero")}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".tmp-{os.getpid()}")
        save_file(tensors, str(tmp), metadata={"paths": json.dumps(native.paths), "layers": str(len(native.layers))})
        os.replace(tmp, cache)  # whole or not at all
    except OSError:
        pass  # no cache this time; the next load reads the GGUF again


def _read_cache(cache: Path, num_layers: int) -> NativeLinears | None:
    """The cached result, or None where there is none or it is damaged or for another depth."""
    from safetensors import safe_open

    if not cache.is_file():
        return None
    try:
        with safe_open(str(cache), framework="pt") as f:
            meta = f.metadata()
            if int(meta["layers"]) != num_layers:
                return None
            names = set(f.keys())
            layers = []
            for i in range(num_layers):
                layer = {}
                for key in LINEARS:
                    parts = [f"{i}.{key}.{part}" for part in ("q", "scale", "zero")]
                    layer[key] = Int4Weight(*(f.get_tensor(n) for n in parts)) if parts[0] in names else None
                layers.append(layer)
            return NativeLinears(layers, json.loads(meta["paths"]))
    except Exception:  # a damaged cache file: read the GGUF again (and rewrite the cache)
        return None


def _read_gguf(path: str | Path, num_layers: int, num_heads: int, num_kv_heads: int) -> NativeLinears:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as err:  # the reader raises many kinds of errors on a bad file
        raise DiffdraftError(f"could not read the GGUF file {path}: {type(err).__name__}: {err}") from err
    tensors = {t.name: t for t in reader.tensors}
    order = {"q": unpermute_rows, "k": unpermute_rows}
    heads = {"q": num_heads, "k": num_kv_heads}
    layers: list[dict[str, Int4Weight | None]] = []
    taken: Counter = Counter()
    left: Counter = Counter()
    for i in range(num_layers):
        layer: dict[str, Int4Weight | None] = {}
        for key, gguf_name in LINEARS.items():
            tensor = tensors.get(f"blk.{i}.{gguf_name}.weight")
            if tensor is None:
                raise DiffdraftError(f"{path} has no tensor blk.{i}.{gguf_name}.weight: not the Llama layout")
            kind = tensor.tensor_type.name
            if kind not in GGUF_INT4_KINDS:
                layer[key] = None
                left[kind] += 1
                continue
            k, n = (int(x) for x in tensor.shape)  # GGUF lists the input size first
            weight = from_gguf(tensor.data.reshape(n, -1), kind, (n, k))
            if key in order:
                weight = weight.take_rows(order[key](n, heads[key]))
            layer[key] = weight
            taken[kind] += 1
        layers.append(layer)
    for name, tensor in tensors.items():
        if not name.startswith("blk.") or name.rsplit(".", 2)[-2] not in LINEARS.values():
            left[tensor.tensor_type.name] += 1
    paths = {kind: f"int4 kernel, as stored ({count} tensors)" for kind, count in taken.items()}
    for kind, count in left.items():
        stored = f"int4 kernel, as stored ({taken[kind]} tensors); " if kind in taken else ""
        paths[kind] = f"{stored}float32, dequantized ({count} tensors)"
    return NativeLinears(layers, paths)
