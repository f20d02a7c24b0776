"""Rotary position embeddings (rotate-half form, as Llama and the drafters use them).

rope_tables turns integer positions into cos/sin tables, from a base theta or from given
inverse frequencies (a loaded model's own, which may carry a scaling); apply_rope rotates
queries or keys. For a runtime that keeps each rotary pair side by side (its q and k weight
rows reordered once by paired_rows), rotate_pairs_in_place rotates in one op: a complex
multiply by the phases of rope_phases. Elementwise per row: nothing here mixes positions.
Knows nothing of models.
"""

from __future__ import annotations

import torch


def inverse_frequencies(head_dim: int, theta: float, device=None) -> torch.Tensor:
    """[head_dim / 2] float32: theta^(-2i / head_dim)."""
    return 1.0 / theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)


def rope_tables(positions: torch.Tensor, head_dim: int, theta: float,
                inv_freq: torch.Tensor | None = None, scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin for integer positions [..., N] -> [..., N, head_dim] each (float32), times `scale`.
    Frequencies come from `inv_freq` where given (theta is then unused), else from theta."""
    if inv_freq is None:
        inv_freq = inverse_frequencies(head_dim, theta, positions.device)
    angles = positions.float()[..., None] * inv_freq.to(positions.device, torch.float32)  # [..., N, hd/2]
    angles = torch.cat([angles, angles], dim=-1)  # [..., N, hd]
    return angles.cos() * scale, angles.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, N, hd]; cos/sin: [B, N, hd] (or broadcastable)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x.dtype)


def paired_rows(heads: int, head_dim: int) -> torch.Tensor:
    """Row order [heads * head_dim] that puts each rotary pair of a rotate-half layout side by side: per head,
    rows p and p + head_dim / 2 go to 2p and 2p + 1. A projection whose q (or k) rows are taken in this order
    gives queries (keys) that rotate_pairs_in_place rotates; their dot products are the same sums, reordered."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=-1).flatten()  # [hd]
    return (torch.arange(heads)[:, None] * head_dim + within).flatten()


def rope_phases(cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Tables of rope_tables [..., hd] -> the rotations as unit complex numbers [..., hd / 2] (complex64)."""
    half = cos.shape[-1] // 2
    return torch.complex(cos[..., :half].float(), sin[..., :half].float())


def rotate_pairs_in_place(x: torch.Tensor, phases: torch.Tensor) -> None:
    """x [..., hd] in paired layout (paired_rows) <- each pair (a, b) rotated: (a cos - b sin, a sin + b cos),
    the rotate-half RoPE of the pair's two rows; phases (rope_phases) broadcast against [..., hd / 2]. One
    complex multiply in place for float32 x; another dtype goes through float32."""
    if x.dtype == torch.float32:
        torch.view_as_complex(x.unflatten(-1, (-1, 2))).mul_(phases)
        return
    wide = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    x.copy_(torch.view_as_real(wide * phases).flatten(-2))
