"""Linear layers whose weights are prepared once for the fastest row-invariant kernel.

On a CPU in float32 a weight is reordered once into oneDNN's blocked layout and every call
goes through oneDNN's linear. Measured on the 2-core development CPU (docs/design.md, 'Targets and runtimes')
that is 1.6x faster than `F.linear` (MKL) for one row and 2x for 16, and, what matters more,
each output row is bit-identical whatever the number of rows in the call, so a forward over
k tokens computes exactly what k one-token forwards compute. `F.linear` has no such property.
Elsewhere (CUDA, or when oneDNN is missing) the weight is kept as it is and `F.linear` runs.
`row_invariant` says which of the two a layer got.

Int4Linear runs 4-bit weights (backends/int4.py) through the fused library's integer
kernel where it builds (backends/int4_kernel.h), else through PyTorch's int4 CPU kernel with the
activations rounded to bfloat16; either way float32 in and out, and its rows are invariant too
(tested).

HalfLinear keeps a weight in float16 in FBGEMM's packed layout and multiplies float32 rows
by it with float32 accumulation and a float32 output: half the bytes a float32 weight reads
per token, the activations and the result untouched. A 4-bit target's LM head and its
drafter run on it (docs/native-weights.md); its rows are invariant too (tested).

Kernels are chosen by what the CPU can do, not by dtype alone: oneDNN's bfloat16 weight
reorder needs AVX-512 (or AVX-NE-CONVERT) and raises on an AVX2-only CPU, so a bfloat16
weight gets oneDNN only where `onednn_bf16_supported()` says so. DIFFDRAFT_CPU_CAPABILITY
(for example AVX2) makes this process act as if its CPU could do no more than that, which
is how the tests check the choice on any machine. This module knows nothing of models.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from diffdraft.backends.int4 import Int4Weight, round_to_nearest


CAPABILITY_ENV = "DIFFDRAFT_CPU_CAPABILITY"
# PyTorch's names for its CPU kernel levels, from least to most capable (x86).
CAPABILITY_ORDER = ("DEFAULT", "AVX2", "AVX512")


def cpuinfo_field(name: str) -> str | None:
    """The value of field `name` ("model name", "flags") for the first CPU in /proc/cpuinfo, or None where
    there is no such file or field."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.split(":", 1)[0].strip() == name:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_capability() -> str:
    """The vector level this process's kernels may use: PyTorch's own reading of the CPU, lowered (never
    raised) by $DIFFDRAFT_CPU_CAPABILITY."""
    found = torch.backends.cpu.get_cpu_capability()
    forced = os.environ.get(CAPABILITY_ENV, "").strip().upper()
    if forced in CAPABILITY_ORDER and found in CAPABILITY_ORDER:
        return min(found, forced, key=CAPABILITY_ORDER.index)
    return found


def onednn_bf16_supported() -> bool:
    """Whether oneDNN can reorder and run bfloat16 weights on this CPU (AVX-512 or AVX-NE-CONVERT)."""
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return cpu_capability() not in ("DEFAULT", "AVX2")  # a lowered capability stands for a CPU without them


def half_supported() -> bool:
    """Whether FBGEMM's float16-weight linear runs here (an x86 CPU with AVX2 and F16C, and the engine built in)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and cpu_capability() in ("AVX2", "AVX512")


def onednn_ready(weight: torch.Tensor) -> bool:
    """True where the reordered oneDNN linear can serve `weight`: on the CPU, float32, or bfloat16 where the
    CPU supports it."""
    return (
        weight.device.type == "cpu"
        and (weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and onednn_bf16_supported()))
        and torch.backends.mkldnn.is_available()
    )


# oneDNN's rows stay invariant for reductions up to 1,024 inputs on the development CPU and not at
# 1,536 (SmolLM2's down projection): longer reductions are cut into equal chunks of at most this
# many inputs, whose partial results are added in a fixed order, row by row.
MAX_CHUNK = 768


class PreparedLinear:
    """y = x W^T (+ b) with W prepared once. x: [..., in] -> [..., out]. Inference only."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, prefer_onednn: bool = True,
                 max_chunk: int = MAX_CHUNK):
        """max_chunk: the longest reduction run in one oneDNN call (see MAX_CHUNK); a caller that needs no
        row invariance passes the input width, which keeps the whole reduction in one call."""
        weight = weight.detach().contiguous()  # [out, in]
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self.row_invariant = prefer_onednn and onednn_ready(weight)
        if self.row_invariant:
            chunks = -(-self.in_features // max_chunk)
            self.splits = [len(part) for part in torch.arange(self.in_features).tensor_split(chunks)]
            self.parts = [torch.ops.mkldnn._reorder_linear_weight(part.contiguous(), None)
                          for part in weight.split(self.splits, dim=1)]
        else:
            self.weight = weight

    def __call__(self, x: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """`widen` is Int4Linear's; here the output is always in x's dtype."""
        if not self.row_invariant:
            return F.linear(x, self.weight, self.bias)
        pieces = x.split(self.splits, dim=-1) if len(self.parts) > 1 else (x,)
        y = torch.ops.mkldnn._linear_pointwise(pieces[0], self.parts[0], self.bias, "none", [], "")
        for piece, part in zip(pieces[1:], self.parts[1:]):
            y = y + torch.ops.mkldnn._linear_pointwise(piece, part, None, "none", [], "")
        return y


# The activation dtype the int4 kernel runs with: its vectorized paths take bfloat16 (float32 activations
# take a scalar loop, about 10x slower; the table in docs/native-weights.md).
INT4_ACTIVATIONS = torch.bfloat16


def int4_fits(out_features: int, in_features: int) -> bool:
    """Whether the int4 kernel takes a weight of this shape: inputs in whole groups of 32, outputs by 16s."""
    return in_features % 32 == 0 and out_features % 16 == 0


class Int4Linear:
    """y = x W^T (+ b) for 4-bit weights in groups of 32 (an Int4Weight). x: [..., in] float32 -> [..., out]
    float32. CPU only. Two kernels, by what this machine has:
    - where the fused C++ library builds (backends/fused.py), its integer kernel (int4_kernel.h): each row
      rounded per group of 32 to 15-bit integers, exact integer dot products, the codes read once for all
      rows; `codes` and `sm` hold the weight in its layout, and the fused layers run on them too;
    - else PyTorch's int4 kernel, the rows rounded to bfloat16, the scales and zeros too (`packed`, `scale_zero`).
    """

    row_invariant = True  # either kernel computes each row alone (tests/test_native_weights.py)

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None):
        from diffdraft.backends import fused  # (fused.py reads this module's cpuinfo_field)

        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().float().contiguous()
        library = fused.library()
        self.codes = self.sm = self.packed = self.scale_zero = None
        if library is not None:  # [out / 16, in / 32, 256] uint8 codes; [out / 16, in / 32, 2, 16] float16 s and m
            self.codes, self.sm = library.pack_int4(weight.q.contiguous(), weight.scale, weight.zero)
            self._linear = library.int4_linear
        else:
            self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.q.to(torch.int32).contiguous(), 1)
            # [in / 32, out, 2]: each group's scale and zero, as the kernel takes them
            self.scale_zero = torch.stack([weight.scale.T, weight.zero.T], dim=-1).to(INT4_ACTIVATIONS).contiguous()

    @property
    def fused_kernel(self) -> bool:
        """Whether it runs the fused library's integer kernel (else PyTorch's int4 kernel)."""
        return self.codes is not None

    def __call__(self, x: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """widen=False may return PyTorch's kernel's bfloat16 output as it is, for a caller that adds it to a
        float32 tensor (the addition widens it exactly, in the same kernel)."""
        if self.fused_kernel:
            y = self._linear(x.reshape(-1, self.in_features).float(), self.codes, self.sm)  # [R, out] float32
            y = y if self.bias is None else y + self.bias
            return y.view(*x.shape[:-1], self.out_features)
        rows = x.reshape(-1, self.in_features).to(INT4_ACTIVATIONS)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, 32, self.scale_zero)
        if widen or self.bias is not None:
            y = y.float() if self.bias is None else y.float() + self.bias
        return y.view(*x.shape[:-1], self.out_features)


class BulkLinear:
    """The same y = x W^T (+ b) as an Int4Linear, for forwards over many rows (a prompt's prefill), where the
    4-bit kernel is slow: it computes row after row, while oneDNN's bfloat16 linear (AMX or AVX-512) shares
    the weight's reads across rows. Measured for all of SmolLM2's decoder linears on the AVX-512 development
    CPU at 96 rows: 22 ms against the 4-bit kernel's 130 ms (docs/native-weights.md). The 4-bit weight is
    dequantized once to bfloat16; x float32 in, float32 out (or bfloat16 with widen=False, as Int4Linear).
    Its rows do not equal the 4-bit kernel's, so a runtime gives it only forwards that no one-token
    forward has to match. Only where `onednn_bf16_supported()`."""

    def __init__(self, weight: Int4Weight, bias: torch.Tensor | None = None):
        self.out_features, self.in_features = weight.shape
        self.kernel = PreparedLinear(weight.dequantize().to(torch.bfloat16), max_chunk=self.in_features)
        self.row_invariant = False  # not asked of it (a prefill's kernel)
        if not self.kernel.row_invariant:  # F.linear in bfloat16 would be slower than the 4-bit kernel
            raise ValueError("BulkLinear needs oneDNN's bfloat16 linear (onednn_bf16_supported())")
        self.bias = None if bias is None else bias.detach().float().contiguous()

    @property
    def packed_weight(self) -> torch.Tensor:
        """The bfloat16 weight in oneDNN's layout (one reduction: the whole input width), for the fused stack."""
        return self.kernel.parts[0]

    def __call__(self, x: torch.Tensor, widen: bool = True) -> torch.Tensor:
        y = self.kernel(x.to(torch.bfloat16))
        if widen or self.bias is not None:
            y = y.float() if self.bias is None else y.float() + self.bias
        return y


class HalfLinear:
    """y = x W^T (+ b) with W rounded once to float16 (FBGEMM's packed layout): x float32 -> y float32, the
    products summed in float32. Half the weight bytes of a float32 linear, for a layer whose weight reads
    dominate (SmolLM2's LM head: 57 MB instead of 113 per token). Each output row is computed alone, whatever
    the number of rows in the call (tests/test_native_weights.py). Only where `half_supported()`; CPU only."""

    row_invariant = True

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        if not half_supported():
            raise ValueError("HalfLinear needs FBGEMM's float16 linear (half_supported())")
        weight = weight.detach().float().contiguous()  # [out, in]
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.packed = torch.ops.quantized.linear_prepack_fp16(weight, self.bias)

    def __call__(self, x: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """`widen` is Int4Linear's; the output is always float32."""
        rows = x.reshape(-1, self.in_features).float()  # [R, in]
        y = torch.ops.quantized.linear_dynamic_fp16(rows, self.packed)  # [R, out]
        return y.view(*x.shape[:-1], self.out_features)


def prepared_linear(weight: torch.Tensor, bias: torch.Tensor | None = None, half: bool = False,
                    prefer_onednn: bool = True, four_bit: bool = False) -> "PreparedLinear | HalfLinear | Int4Linear":
    """The kernel for an inference-only float linear: with `four_bit` an Int4Linear of the weight rounded to 4 bits
    (round to nearest, groups of 32) where its shape allows (int4_fits), else with `half` a HalfLinear, else a
    PreparedLinear."""
    if four_bit and int4_fits(*weight.shape):
        return Int4Linear(round_to_nearest(weight.detach().float()), bias)
    if half:
        return HalfLinear(weight, bias)
    return PreparedLinear(weight.detach(), bias, prefer_onednn)


class AdaptedLinear:
    """A prepared kernel plus a low-rank update: y = base(x) + (x A^T) B^T, with A [r, in] and B [out, r] (any
    scale folded into B), the update's two matmuls through prepared oneDNN linears, so rows stay invariant
    where the base's are. What a LoRA adapter adds, without merging it into 4-bit weights (where rounding
    would erase it). x float32 -> float32."""

    def __init__(self, base: "PreparedLinear | Int4Linear | BulkLinear", a: torch.Tensor, b: torch.Tensor):
        self.base = base
        self.out_features, self.in_features = base.out_features, base.in_features
        self.down = PreparedLinear(a.float())  # [R, in] -> [R, r]
        self.up = PreparedLinear(b.float())  # [R, r] -> [R, out]
        self.row_invariant = base.row_invariant and self.down.row_invariant and self.up.row_invariant

    def __call__(self, x: torch.Tensor, widen: bool = True) -> torch.Tensor:
        return self.base(x) + self.up(self.down(x))


class PreparedLinearModule(nn.Module):
    """A drop-in for an inference-only nn.Linear that runs through prepared_linear's kernel."""

    def __init__(self, linear: nn.Linear, half: bool = False, four_bit: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.kernel = prepared_linear(linear.weight, linear.bias, half, four_bit=four_bit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernel(x)


def prepared_copy(module: nn.Module, device: torch.device, dtype: torch.dtype, half: bool = False,
                  four_bit: bool = False) -> nn.Module:
    """An inference-only copy of a network on `device` in `dtype`, whose every nn.Linear runs
    through a PreparedLinear, or with `half` (float32 only) a HalfLinear, or with `four_bit` (float32 on the CPU
    only) an Int4Linear. The original is left as it was (a trainer may still be training it)."""
    prepared = copy.deepcopy(module).to(device=device, dtype=dtype).eval().requires_grad_(False)
    for parent in list(prepared.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PreparedLinearModule(child, half=half, four_bit=four_bit))
    return prepared
