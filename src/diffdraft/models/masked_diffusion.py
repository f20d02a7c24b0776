"""The standalone masked-diffusion drafter network (docs/design.md, 'Drafters', the SpecDiff/DEER setting).

A small transformer of the target's width that reads no target features: it runs over
[prefix tokens, block] where the prefix is causal and the block [known token, then each
slot either a revealed token or MASK] is bidirectional and sees the whole prefix. The
prefix keys/values can be cached (they never depend on the block). Layers are the same
pre-norm attention + SwiGLU layers as the block-diffusion drafter's; they can start as a
copy of the target's first layers, so the drafter begins as a truncated target. Embedding
and LM head are the target's (frozen, outside). Pure network: no decoding, no data.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from diffdraft.models.block_diffusion import DrafterLayer, DrafterLayersConfig, reset_drafter_weights
from diffdraft.rope import rope_tables

KV = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, Hkv, N, hd]


@dataclass(frozen=True)
class MaskedDiffusionConfig(DrafterLayersConfig):
    """The standalone drafter's sizes: just its layers (it reads no target features)."""


class MaskedDiffusionNet(nn.Module):
    """Layers + final norm + a learned MASK embedding."""

    def __init__(self, cfg: MaskedDiffusionConfig):
        super().__init__()
        self.cfg = cfg
        self.mask_embedding = nn.Parameter(torch.zeros(cfg.hidden_size))
        self.layers = nn.ModuleList(DrafterLayer(cfg) for _ in range(cfg.num_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_eps)
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        reset_drafter_weights(self, generator, small_residuals=False)  # its layers come from the target

    @torch.no_grad()
    def init_from_target(self, model) -> None:
        """Copy the first num_layers decoder layers and the final norm of an HF Llama-style model."""
        layers = model.model.layers
        if len(layers) < self.cfg.num_layers:
            raise ValueError(f"the target has {len(layers)} layers, the drafter wants {self.cfg.num_layers}")
        for mine, theirs in zip(self.layers, layers):
            attn, mlp = theirs.self_attn, theirs.mlp
            mine.q_proj.weight.copy_(attn.q_proj.weight)
            mine.kv_proj.weight.copy_(torch.cat([attn.k_proj.weight, attn.v_proj.weight], dim=0))
            mine.o_proj.weight.copy_(attn.o_proj.weight)
            mine.gate_up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0))
            mine.down.weight.copy_(mlp.down_proj.weight)
            mine.attn_norm.weight.copy_(theirs.input_layernorm.weight)
            mine.mlp_norm.weight.copy_(theirs.post_attention_layernorm.weight)
        self.norm.weight.copy_(model.model.norm.weight)

    def block_inputs(self, token_embeds: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
        """token_embeds [B, N, D], masked [B, N] bool -> inputs with MASK where masked."""
        return torch.where(masked[..., None], self.mask_embedding.to(token_embeds.dtype), token_embeds)

    def forward(
        self,
        x: torch.Tensor,  # [B, N, D] input embeddings (prefix tokens, block slots, or both)
        positions: torch.Tensor,  # [B, N]
        past: KV | None,  # cached prefix keys/values, or None
        mask: torch.Tensor | None,  # [B, 1, N, P+N] bool (True = attend); None = attend to all
    ) -> tuple[torch.Tensor, KV]:
        """Final-normed hidden states [B, N, D], and the keys/values of x for a cache."""
        cos, sin = rope_tables(positions, self.cfg.head_dim, self.cfg.rope_theta)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        h, new_kv = x, []
        for index, layer in enumerate(self.layers):
            if past is None:
                empty = x.new_zeros(x.shape[0], self.cfg.num_kv_heads, 0, self.cfg.head_dim)
                past_k, past_v = empty, empty
            else:
                past_k, past_v = past[index]
            h, kv = layer.forward_with_kv(h, past_k, past_v, cos, sin, mask)
            new_kv.append(kv)
        return self.norm(h), new_kv

