"""Rotary position embeddings (rotate-half form, as Llama and the drafters use them).

rope_tables turns integer positions into cos/sin tables, from a base theta or from given
inverse frequencies (a loaded model's own, which may carry a scaling); apply_rope rotates
queries or keys; rotate_in_place does the same in three ops on a tensor it may overwrite,
with the sine table signed once (signed_sin) instead of negating half of x at every call. Elementwise per row: nothing here mixes positions. Knows nothing of models.
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


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """A sin table [..., hd] with its first half negated, for rotate_in_place."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def rotate_in_place(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> None:
    """x [..., hd] <- x * cos + rotate_half(x) * sin, written into x; cos / sin_signed broadcast against x.
    rotate_half(x) * sin equals the halves of x swapped times signed_sin(sin), exactly."""
    half = x.shape[-1] // 2
    swapped = x.unflatten(-1, (2, half)).flip(-2).flatten(-2)  # [..., hd]: (x2, x1), a copy
    x.mul_(cos).addcmul_(swapped, sin_signed)
