"""The block-diffusion LM: an HF Llama run under an explicit attention mask, plus LoRA and MASK.

The forward is written here over the HF modules' weights (norms, projections, rotary
tables, LM head), so that every call takes its own boolean attention mask over
[cached tokens | new tokens] and its own position ids: causal for a prompt, bidirectional
inside a block, per-state groups for SimSD verification. The vocabulary has no mask
token, so MASK_ID (-1) in an id tensor means "the learned mask embedding".
Slot i of a block is predicted from the position before it (the token shift of Dream and
Fast-dLLM v2, see `slot_hidden`): slot 0 from the last context token, slot i from slot
i-1 of the same copy of the block. The LM head therefore keeps its AR meaning, "the next
token", and a fresh conversion already predicts slot 0 exactly as the AR model does; the
fine-tune only has to teach the model to read mask slots. With
`num_layers` < the base depth it is the cheap drafter: the first layers, then the final
norm and the LM head. The base model is referenced, never copied, modified or saved; only
the adapters and the mask embedding are parameters of this module.
It knows nothing of which mask to use when, of decoding order, or of verification.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from diffdraft.dllm.cache import KVCache
from diffdraft.dllm.lora import PROJECTIONS, LoraAdapters, base_linear
from diffdraft.errors import DiffdraftError

MASK_ID = -1  # an id that is no token: the slot holds the mask embedding


@dataclass(frozen=True)
class DLLMConfig:
    """What a converted model (or a drafter) is: block size, depth used, adapter shape."""

    block_size: int = 4
    num_layers: int | None = None  # None: every layer of the base model (the target)
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = tuple(PROJECTIONS)

    def __post_init__(self) -> None:
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or not 1 <= self.block_size <= 64:
            raise DiffdraftError(f"block size must be an integer in 1..64, got {self.block_size!r}")
        if self.num_layers is not None and self.num_layers < 1:
            raise DiffdraftError(f"layers must be >= 1, got {self.num_layers}")
        if self.rank < 1:
            raise DiffdraftError(f"LoRA rank must be >= 1, got {self.rank}")

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["targets"] = list(self.targets)
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "DLLMConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        data = {k: v for k, v in data.items() if k in names}
        if "targets" in data:
            data["targets"] = tuple(data["targets"])
        return cls(**data)


class BlockDiffusionLM(nn.Module):
    """Adapters + mask embedding over a frozen HF Llama (`base`, a LlamaForCausalLM)."""

    def __init__(self, base: nn.Module, config: DLLMConfig):
        super().__init__()
        body = getattr(base, "model", None)
        if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
            raise DiffdraftError("a block-diffusion model needs a Llama-family HF model (model.layers, rotary_emb)")
        depth = len(body.layers)
        used = config.num_layers or depth
        if used > depth:
            raise DiffdraftError(f"asked for {used} layers; the base model has {depth}")
        self.config = config
        self.num_layers = used
        self._base = (base,)  # a tuple keeps it out of this module's parameters and state_dict
        hidden = base.config.hidden_size
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.adapters = LoraAdapters(list(body.layers[:used]), config.targets, config.rank, config.alpha)
        self.to(device=base.lm_head.weight.device)

    @property
    def base(self) -> nn.Module:
        return self._base[0]

    @property
    def block_size(self) -> int:
        return self.config.block_size

    @property
    def vocab_size(self) -> int:
        return self.base.lm_head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.base.lm_head.weight.device

    def reset_parameters(self, generator: torch.Generator | None) -> None:
        """Fresh adapters (B = 0) and a mask embedding at the mean token embedding."""
        self.adapters.reset_parameters(generator)
        with torch.no_grad():
            self.mask_embedding.copy_(self.base.model.embed_tokens.weight.float().mean(dim=0))

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] (MASK_ID allowed) -> input embeddings [B, T, D]."""
        tokens = self.base.model.embed_tokens(ids.clamp(min=0))  # [B, T, D]
        mask = self.mask_embedding.to(tokens.dtype).expand_as(tokens)
        return torch.where((ids == MASK_ID)[..., None], mask, tokens)

    def forward(
        self,
        ids: torch.Tensor,  # [B, T] new tokens, MASK_ID for masked slots
        positions: torch.Tensor,  # [B, T] RoPE positions
        attn_mask: torch.Tensor,  # [B, 1, T, C+T] bool, True = may attend; keys are [cache | new]
        cache: KVCache | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Hidden states after the final norm [B, T, D], and each layer's new keys/values [B, Hkv, T, hd]."""
        cached = cache.length if cache is not None else 0
        if attn_mask.shape[-2:] != (ids.shape[1], cached + ids.shape[1]):
            raise ValueError(f"mask {tuple(attn_mask.shape)} does not fit {ids.shape[1]} new and {cached} cached tokens")
        body = self.base.model
        h = self.embed(ids.to(self.device))  # [B, T, D]
        cos, sin = body.rotary_emb(h, position_ids=positions.to(self.device))  # [B, T, hd] each
        attn_mask = attn_mask.to(self.device)
        new_kv = []
        for index, layer in enumerate(body.layers[: self.num_layers]):
            attn = layer.self_attn
            batch, length, _ = h.shape
            x = layer.input_layernorm(h)
            q = self._proj(index, layer, "q", x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            k = self._proj(index, layer, "k", x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            v = self._proj(index, layer, "v", x).view(batch, length, -1, attn.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)  # [B, H, T, hd], [B, Hkv, T, hd]
            new_kv.append((k, v))
            past = cache.layer(index) if cache is not None else None
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            out = F.scaled_dot_product_attention(
                q, k.to(q.dtype), v.to(q.dtype), attn_mask=attn_mask, scale=attn.scaling, enable_gqa=True
            )  # [B, H, T, hd]
            h = h + self._proj(index, layer, "o", out.transpose(1, 2).reshape(batch, length, -1))
            x = layer.post_attention_layernorm(h)
            mlp = layer.mlp
            gated = mlp.act_fn(self._proj(index, layer, "gate", x)) * self._proj(index, layer, "up", x)
            h = h + self._proj(index, layer, "down", gated)
        return body.norm(h), new_kv

    @staticmethod
    def slot_hidden(before: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The hidden states whose logits predict a block's slots: slot 0 from `before`, the last
        context position, and slot i from row i-1. before [D], rows [b, D] -> [b, D]. The same shift
        applies to the rows' logits ([V] and [b, V]), which the LM head computes row by row."""
        return torch.cat([before[None], rows[:-1]], dim=0)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [..., D] -> logits [..., V] through the base LM head."""
        return self.base.lm_head(hidden)

    def _proj(self, index: int, layer: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
        return self.adapters.apply(index, name, base_linear(layer, name), x)
