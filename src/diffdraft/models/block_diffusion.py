"""The conditioned block-diffusion drafter network (docs/design.md, 'Drafters').

n transformer layers of the target's width. Hidden states tapped from several target
layers are concatenated and fused (linear + RMSNorm) into one context feature per token;
every layer projects those features into extra keys/values. Queries come only from the
block [known token, MASK x (g-1)]: the block attends to its context and bidirectionally
to itself, and one pass predicts every masked position. Embedding and LM head are the
target's (passed in, frozen, never stored here). This module is pure network: it knows
nothing of caches, decoding or training data.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from diffdraft.rope import apply_rope, rope_tables


@dataclass(frozen=True)
class DrafterLayersConfig:
    """Sizes of a stack of drafter layers (shared by both diffusion drafters' configs)."""

    hidden_size: int
    num_layers: int = 2
    num_heads: int = 9
    num_kv_heads: int = 3
    head_dim: int = 64
    intermediate_size: int = 1536
    block_size: int = 16  # g: the known token plus g-1 masked positions
    rope_theta: float = 100000.0
    rms_eps: float = 1e-5
    qk_norm: bool = False  # RMSNorm over each head's queries and keys before RoPE (Qwen3, DFlash)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict):
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class BlockDiffusionConfig(DrafterLayersConfig):
    num_taps: int = 3  # target layers whose hidden states are fused into the context
    # The block's MASK input: None = a learned vector of the drafter's own; a token id = that row of the
    # target's (frozen) embedding, as DFlash drafters do and as vLLM and SGLang feed them.
    mask_token_id: int | None = None

    @property
    def dflash_layout(self) -> bool:
        """Whether this network is DFlash's: q/k norms and a mask token of the target's vocabulary."""
        return self.qk_norm and self.mask_token_id is not None


class DrafterLayer(nn.Module):
    """Pre-norm attention + SwiGLU MLP; keys/values from [context features; block]."""

    def __init__(self, cfg: BlockDiffusionConfig):
        super().__init__()
        self.cfg = cfg
        d, hd = cfg.hidden_size, cfg.head_dim
        self.attn_norm = nn.RMSNorm(d, eps=cfg.rms_eps)
        self.q_proj = nn.Linear(d, cfg.num_heads * hd, bias=False)
        self.kv_proj = nn.Linear(d, 2 * cfg.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(cfg.num_heads * hd, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d, eps=cfg.rms_eps)
        self.gate_up = nn.Linear(d, 2 * cfg.intermediate_size, bias=False)
        self.down = nn.Linear(cfg.intermediate_size, d, bias=False)
        if cfg.qk_norm:
            self.q_norm = nn.RMSNorm(hd, eps=cfg.rms_eps)
            self.k_norm = nn.RMSNorm(hd, eps=cfg.rms_eps)

    def context_kv(self, ctx: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys/values of context features. ctx: [B, C, D] (fused, normed) -> 2 x [B, Hkv, C, hd]."""
        return self._kv(ctx, cos, sin)

    def _kv(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, n, _ = x.shape
        kv = self.kv_proj(x).view(b, n, 2, self.cfg.num_kv_heads, self.cfg.head_dim)
        k = kv[:, :, 0]  # [B, N, Hkv, hd]
        if self.cfg.qk_norm:
            k = self.k_norm(k)
        v = kv[:, :, 1].transpose(1, 2)  # [B, Hkv, N, hd]
        return apply_rope(k.transpose(1, 2), cos, sin), v

    def forward(
        self,
        h: torch.Tensor,  # [B, G, D] block hidden states
        ctx_k: torch.Tensor,  # [B, Hkv, C, hd]
        ctx_v: torch.Tensor,  # [B, Hkv, C, hd]
        cos: torch.Tensor,  # [B, G, hd] rope of the block positions
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # [B, 1, G, C+G] bool, True = may attend; None = all
    ) -> torch.Tensor:
        return self.forward_with_kv(h, ctx_k, ctx_v, cos, sin, mask)[0]

    def forward_with_kv(self, h, ctx_k, ctx_v, cos, sin, mask) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """forward(), also returning the keys/values of h itself (2 x [B, Hkv, G, hd]) for a cache."""
        b, g, _ = h.shape
        cfg = self.cfg
        x = self.attn_norm(h)
        q = self.q_proj(x).view(b, g, cfg.num_heads, cfg.head_dim)  # [B, G, H, hd]
        if cfg.qk_norm:
            q = self.q_norm(q)
        q = apply_rope(q.transpose(1, 2), cos, sin)  # [B, H, G, hd]
        k_blk, v_blk = self._kv(x, cos, sin)
        k = torch.cat([ctx_k, k_blk], dim=2)  # [B, Hkv, C+G, hd]
        v = torch.cat([ctx_v, v_blk], dim=2)
        attn = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)  # [B, H, G, hd]
        h = h + self.o_proj(attn.transpose(1, 2).reshape(b, g, -1))
        gate, up = self.gate_up(self.mlp_norm(h)).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up), (k_blk, v_blk)


def reset_drafter_weights(net: nn.Module, generator: torch.Generator | None, small_residuals: bool) -> None:
    """A drafter network's fresh weights: every linear ~ N(0, 1/D), the MASK embedding ~ N(0, 0.02^2).

    `net` has `cfg` (hidden_size, num_layers), `layers` of DrafterLayer and `mask_embedding` (None when the
    mask is a target token). Norm weights stay 1.
    With small_residuals each layer's output projections start 1/sqrt(2n) smaller, for a stack
    trained from scratch; a network whose layers are then copied from the target does not need it.
    """
    std = 1.0 / math.sqrt(net.cfg.hidden_size)
    for module in net.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std, generator=generator)
    if small_residuals:
        for layer in net.layers:
            for weight in (layer.o_proj.weight, layer.down.weight):
                nn.init.normal_(weight, std=std / math.sqrt(2 * net.cfg.num_layers), generator=generator)
    if net.mask_embedding is not None:
        nn.init.normal_(net.mask_embedding, std=0.02, generator=generator)


class BlockDiffusionNet(nn.Module):
    """Fuse + layers + final norm. Logits come from the target's LM head, outside."""

    def __init__(self, cfg: BlockDiffusionConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.fuse = nn.Linear(cfg.num_taps * d, d, bias=False)
        self.fuse_norm = nn.RMSNorm(d, eps=cfg.rms_eps)
        self.mask_embedding = nn.Parameter(torch.zeros(d)) if cfg.mask_token_id is None else None
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(d, eps=cfg.rms_eps)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        reset_drafter_weights(self, generator, small_residuals=True)

    def fuse_context(self, taps: torch.Tensor) -> torch.Tensor:
        """taps: [B, C, n_taps*D] -> context features [B, C, D]."""
        return self.fuse_norm(self.fuse(taps))

    def context_kv(self, ctx: torch.Tensor, positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer keys/values of context features ctx [B, C, D] at positions [B, C]."""
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        cos, sin = cos.to(ctx.dtype), sin.to(ctx.dtype)
        return [layer.context_kv(ctx, cos, sin) for layer in self.layers]

    def mask_vector(self, embed_tokens: nn.Embedding) -> torch.Tensor:
        """The MASK input [D]: the learned vector, or the mask token's row of the target's embedding."""
        if self.mask_embedding is not None:
            return self.mask_embedding
        return embed_tokens.weight[self.cfg.mask_token_id]

    def block_inputs(self, known_embeds: torch.Tensor, mask: torch.Tensor, size: int | None = None) -> torch.Tensor:
        """Block input embeddings: known_embeds [B, nb, D], mask [D] (mask_vector) -> [B, nb*g, D] as
        [tok, MASK x (g-1)] per block, g the block size (or `size`, for a shorter block)."""
        b, nb, d = known_embeds.shape
        g = size or self.cfg.block_size
        blocks = mask.to(known_embeds.dtype).expand(b, nb, g, d).clone()
        blocks[:, :, 0] = known_embeds
        return blocks.reshape(b, nb * g, d)

    def forward(
        self,
        block: torch.Tensor,  # [B, Q, D] block input embeddings (one or many blocks)
        block_positions: torch.Tensor,  # [B, Q]
        ctx_kv: list[tuple[torch.Tensor, torch.Tensor]],  # per layer, [B, Hkv, C, hd] each
        mask: torch.Tensor | None,  # [B, 1, Q, C+Q] bool
    ) -> torch.Tensor:
        """Hidden states of the block positions, [B, Q, D], final norm applied."""
        cos, sin = rope_tables(block_positions, self.cfg.head_dim, self.cfg.rope_theta)
        cos, sin = cos.to(block.dtype), sin.to(block.dtype)
        h = block
        for layer, (k, v) in zip(self.layers, ctx_kv):
            h = layer(h, k, v, cos, sin, mask)
        return self.norm(h)
