"""4-bit weights in groups of 32: the layout PyTorch's int4 CPU kernel takes, and the ways into it.

A weight [N, K] is held as codes q in 0..15 with one scale and one zero per group of 32
inputs of a row, and stands for w = (q - 8) * scale + zero (the kernel's own formula).
Two ways in (docs/native-weights.md):
- `from_gguf`: a GGUF tensor's Q4_0, Q4_1 or Q4_K blocks, taken as they are. Each of these
  formats is exactly such a group with a scale and an offset (Q4_1: w = d*q + m, so
  scale = d, zero = m + 8d), so nothing is re-rounded here; the kernel later rounds the
  scales and zeros to bfloat16.
- `round_to_nearest`: a float weight rounded per group between its minimum and maximum (for
  float models). On weights that came from Q4_1 this gives back the same codes.
This module knows nothing of models, layers or kernels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

GROUP = 32
# GGUF tensor types that are groups of 32 with a scale and an offset, and their block sizes in bytes.
GGUF_INT4_KINDS = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}


@dataclass
class Int4Weight:
    """w = (q - 8) * scale + zero, per group of GROUP inputs. q [N, K] uint8; scale, zero [N, K // GROUP] float32."""

    q: torch.Tensor
    scale: torch.Tensor
    zero: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.q.shape)

    def dequantize(self) -> torch.Tensor:
        """The float32 weight [N, K] these codes stand for."""
        n, k = self.q.shape
        groups = (self.q.float() - 8).view(n, k // GROUP, GROUP)
        return (groups * self.scale[..., None] + self.zero[..., None]).view(n, k)

    def take_rows(self, index: torch.Tensor) -> "Int4Weight":
        """Rows in a new order (output rows are independent, so any permutation is exact)."""
        return Int4Weight(self.q[index], self.scale[index], self.zero[index])

    @staticmethod
    def cat(parts: list["Int4Weight"]) -> "Int4Weight":
        """Several weights stacked on the output side (q/k/v, gate/up)."""
        return Int4Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("q", "scale", "zero")))


def round_to_nearest(weight: torch.Tensor) -> Int4Weight:
    """A float weight [N, K] (K a multiple of 32) as 4-bit codes: per group, 16 evenly spaced levels from
    its minimum to its maximum, each weight to the nearest."""
    n, k = weight.shape
    check_groups(k)
    groups = weight.detach().float().reshape(n, k // GROUP, GROUP)
    low, high = groups.amin(-1), groups.amax(-1)  # [N, K/32]
    scale = (high - low) / 15
    step = torch.where(scale > 0, scale, torch.ones_like(scale))  # a constant group: every code 0
    q = ((groups - low[..., None]) / step[..., None]).round().clamp(0, 15).to(torch.uint8)
    return Int4Weight(q.reshape(n, k), scale, low + 8 * scale)


def check_groups(k: int) -> None:
    if k % GROUP:
        raise ValueError(f"4-bit groups of {GROUP} need an input size divisible by {GROUP}, got {k}")


def _halves(qs: np.ndarray) -> np.ndarray:
    """Bytes [..., 16] holding 32 codes (low nibbles first, then high) -> codes [..., 32]."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray, at: int) -> np.ndarray:
    """The float16 at byte `at` of every block [..., bytes] -> float32 [...]."""
    return raw[..., at : at + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def from_gguf(raw: np.ndarray, kind: str, shape: tuple[int, int]) -> Int4Weight:
    """A GGUF tensor's bytes [N, row bytes] of type `kind` (Q4_0, Q4_1 or Q4_K) for a weight [N, K]."""
    if kind not in GGUF_INT4_KINDS:
        raise ValueError(f"GGUF type {kind} is not a 4-bit group format ({', '.join(GGUF_INT4_KINDS)})")
    n, k = shape
    per_block, size = GGUF_INT4_KINDS[kind]
    if k % per_block or raw.shape != (n, k // per_block * size):
        raise ValueError(f"{kind} bytes {raw.shape} do not fit a weight of shape {shape}")
    blocks = raw.reshape(n, k // per_block, size)
    if kind == "Q4_0":  # d, 16 bytes of codes: w = (q - 8) d
        q, scale = _halves(blocks[..., 2:]), _f16(blocks, 0)
        zero = np.zeros_like(scale)
    elif kind == "Q4_1":  # d, m, 16 bytes of codes: w = q d + m
        q, scale = _halves(blocks[..., 4:]), _f16(blocks, 0)
        zero = _f16(blocks, 2) + 8 * scale
    else:
        q, scale, zero = _q4_k(blocks)
    return Int4Weight(torch.from_numpy(np.ascontiguousarray(q).reshape(n, k)),
                      torch.from_numpy(np.ascontiguousarray(scale).reshape(n, k // GROUP)),
                      torch.from_numpy(np.ascontiguousarray(zero).reshape(n, k // GROUP)))


def _q4_k(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K super-blocks [N, B, 144] (d, dmin, 12 bytes of 6-bit scales and mins for 8 groups, 128 bytes of
    codes) -> codes [N, B, 8, 32], scales and zeros [N, B, 8]. A group's weight is d*s*q - dmin*m."""
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    packed = blocks[..., 4:16].astype(np.uint8)  # [N, B, 12]
    low, mid, high = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([low & 63, (high & 0x0F) | ((low >> 6) << 4)], axis=-1).astype(np.float32)
    mins = np.concatenate([mid & 63, (high >> 4) | ((mid >> 6) << 4)], axis=-1).astype(np.float32)
    codes = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 32)  # 4 chunks of 32 bytes: groups 2c (low) and 2c+1 (high)
    q = np.stack([codes & 0x0F, codes >> 4], axis=3).reshape(*blocks.shape[:2], 8, 32)
    scale = d[..., None] * scales
    return q, scale, -dmin[..., None] * mins + 8 * scale
