"""The lean backend: a static-cache runtime for Llama-family targets, row-invariant by construction.

Built from a loaded HF Llama (SmolLM2, any Llama-architecture folder or GGUF); its weights
are read once and prepared for the fastest row-invariant kernel (backends/kernels.py),
with q/k/v and gate/up fused into one linear each. Each sequence's KV cache (in its
TargetState) is one preallocated tensor per K and V, [layers, kv heads, capacity, head dim];
crop is a change of length. Only the tapped layers' hidden states are kept, and only when
asked for.

Batch invariance: for a forward over k <= `invariant_rows` tokens, every operation computes
each row exactly as a one-token forward at that position would. Linears, norms, RoPE and the
MLP are row-wise; attention runs one query row per call, over that row's own prefix of the
cache, which is the very call a one-token forward makes. So on the CPU in float32 the
logits of a verify forward are bit-identical to k one-token forwards (tested), and greedy
speculative decoding equals plain decoding by construction. Longer forwards (a long
prompt's prefill) attend in one masked call instead: plain and speculative decoding share
that prefill, so equality does not depend on it.

It knows nothing of drafting. One sequence per state (batch size 1). On CUDA the same module
runs with `F.linear` (no CUDA graphs yet: no GPU was lent to test them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffdraft.backends.kernels import PreparedLinear
from diffdraft.errors import DiffdraftError
from diffdraft.rope import apply_rope, rope_tables
from diffdraft.target import TargetBackend, TargetOutput, TargetState

# Verify forwards up to this many tokens are computed row by row (draft lengths are far below it).
INVARIANT_ROWS = 32
# RoPE kinds whose frequencies do not change with the sequence length.
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def lean_unsupported(module: nn.Module) -> str | None:
    """Why the lean runtime cannot run `module`, or None when it can."""
    config = getattr(module, "config", None)
    if getattr(config, "model_type", None) != "llama":
        return f"architecture {getattr(config, 'model_type', type(module).__name__)!r} is not in the Llama family"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"activation {config.hidden_act!r} is not silu"
    rope = (getattr(config, "rope_parameters", None) or {}).get("rope_type", "default")
    if rope not in STATIC_ROPE:
        return f"RoPE type {rope!r} changes with the sequence length"
    body = getattr(module, "model", None)
    if body is None or not hasattr(body, "layers") or not hasattr(body, "rotary_emb"):
        return "the model body has no layers or rotary embedding where a Llama keeps them"
    return None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Llama's RMSNorm, row by row, in float32 like HF's. x: [k, D] -> [k, D] in weight's dtype."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(weight.dtype)


class _LeanLayer:
    """One decoder layer's prepared weights."""

    def __init__(self, layer: nn.Module, prefer_onednn: bool):
        attn, mlp = layer.self_attn, layer.mlp
        qkv = [attn.q_proj, attn.k_proj, attn.v_proj]
        bias = [p.bias for p in qkv]
        self.qkv = PreparedLinear.fused([p.weight for p in qkv], prefer_onednn)
        if all(b is not None for b in bias):
            self.qkv.bias = torch.cat([b.detach() for b in bias])
        self.o = PreparedLinear(attn.o_proj.weight, attn.o_proj.bias, prefer_onednn)
        self.gate_up = PreparedLinear.fused([mlp.gate_proj.weight, mlp.up_proj.weight], prefer_onednn)
        self.down = PreparedLinear(mlp.down_proj.weight, mlp.down_proj.bias, prefer_onednn)
        self.attn_norm = layer.input_layernorm.weight.detach()
        self.mlp_norm = layer.post_attention_layernorm.weight.detach()
        self.intermediate = mlp.gate_proj.weight.shape[0]


class LeanLlamaTarget(TargetBackend):
    """Static-cache Llama decoding on prepared weights (see the module docstring)."""

    kind = "lean"

    def __init__(
        self,
        module: nn.Module,
        tokenizer,
        tap_layers: tuple[int, ...] | None = None,
        name: str = "model",
        cache_tokens: int | None = None,
        invariant_rows: int = INVARIANT_ROWS,
        prefer_onednn: bool = True,
    ):
        reason = lean_unsupported(module)
        if reason:
            raise DiffdraftError(f"the lean runtime cannot run this model: {reason}; use --backend hf")
        super().__init__(module, tokenizer, tap_layers, name)
        cfg = module.config
        body = module.model
        if cache_tokens is not None:
            if cache_tokens < 2:
                raise DiffdraftError(f"the KV cache must hold at least 2 tokens, got {cache_tokens}")
            self.max_context = min(self.max_context, cache_tokens)
        self.num_heads: int = cfg.num_attention_heads
        self.num_kv_heads: int = cfg.num_key_value_heads
        self.head_dim: int = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.eps: float = cfg.rms_norm_eps
        self.invariant_rows = invariant_rows
        with torch.no_grad():
            self._layers = [_LeanLayer(layer, prefer_onednn) for layer in body.layers]
            self._final_norm = body.norm.weight.detach()
            self._embed = body.embed_tokens.weight.detach()  # [V, D]
            self._head = PreparedLinear(module.lm_head.weight, None, prefer_onednn)
            self._cos, self._sin = self._rope_tables(body.rotary_emb)  # [C, hd] each
        self.row_invariant = all(
            lin.row_invariant for layer in self._layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)
        ) and self._head.row_invariant

    def _rope_tables(self, rotary: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The model's own frequencies and scaling (as its rotary module holds them) at every position."""
        positions = torch.arange(self.max_context, device=self.device)
        cos, sin = rope_tables(positions, self.head_dim, 0.0, inv_freq=rotary.inv_freq, scale=rotary.attention_scaling)
        return cos.to(self.dtype), sin.to(self.dtype)

    # ----- incremental decoding -----
    def _empty_cache(self, old: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values, [L, Hkv, C, hd] each, for the whole context: a restarted sequence keeps its
        own. Untouched pages cost nothing until written (SmolLM2: 377 MB reserved, a few ms per request)."""
        if old is not None:
            return old
        keys = torch.empty((self.num_layers, self.num_kv_heads, self.max_context, self.head_dim), device=self.device,
                           dtype=self.dtype)
        return keys, torch.empty_like(keys)

    def _crop_cache(self, state: TargetState, n: int) -> None:
        pass  # positions past the length are overwritten before they are read

    @torch.inference_mode()
    def _run(self, state: TargetState, ids: torch.Tensor, want_taps: bool, last_only: bool) -> TargetOutput:
        """ids: [1, k]. Writes the k tokens' keys/values at positions length..length+k-1 of the state's cache."""
        if ids.shape[0] != 1:
            raise ValueError(f"the lean runtime decodes one sequence at a time, got a batch of {ids.shape[0]}")
        k = ids.shape[1]
        self._check_room(state, k)
        start = state.length
        cache_k, cache_v = state.cache
        x = F.embedding(ids[0].to(self.device), self._embed)  # [k, D]
        cos, sin = self._cos[None, start : start + k], self._sin[None, start : start + k]  # [1, k, hd]
        taps = {0: x} if want_taps and 0 in self.tap_layers else {}
        heads, kv_heads, hd = self.num_heads, self.num_kv_heads, self.head_dim
        for index, layer in enumerate(self._layers):
            qkv = layer.qkv(rms_norm(x, layer.attn_norm, self.eps))  # [k, (H + 2 Hkv) hd]
            q, key, value = qkv.split([heads * hd, kv_heads * hd, kv_heads * hd], dim=-1)
            q = apply_rope(q.view(1, k, heads, hd).transpose(1, 2), cos, sin)[0]  # [H, k, hd]
            key = apply_rope(key.view(1, k, kv_heads, hd).transpose(1, 2), cos, sin)[0]  # [Hkv, k, hd]
            cache_k[index, :, start : start + k] = key
            cache_v[index, :, start : start + k] = value.view(k, kv_heads, hd).transpose(0, 1)
            attended = self._attend(q, cache_k[index], cache_v[index], start)  # [k, H hd]
            x = x + layer.o(attended)
            gate, up = layer.gate_up(rms_norm(x, layer.mlp_norm, self.eps)).split(layer.intermediate, dim=-1)
            x = x + layer.down(F.silu(gate) * up)
            if want_taps and index + 1 in self.tap_layers and index + 1 < self.num_layers:
                taps[index + 1] = x
        state.length = start + k
        if want_taps and self.num_layers in self.tap_layers:
            taps[self.num_layers] = rms_norm(x, self._final_norm, self.eps)  # HF's last hidden state is normed
        hidden = x[-1:] if last_only else x
        logits = self._head(rms_norm(hidden, self._final_norm, self.eps))  # [k or 1, V]
        tapped = torch.cat([taps[i] for i in self.tap_layers], dim=-1)[None] if want_taps else None
        return TargetOutput(logits=logits[None], taps=tapped)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int) -> torch.Tensor:
        """Causal attention of q [H, k, hd] (positions start..start+k-1) over one layer's cached keys and
        values [Hkv, C, hd] -> [k, H hd]."""
        heads, k, hd = q.shape
        if k <= self.invariant_rows:
            rows = [
                F.scaled_dot_product_attention(
                    q[None, :, i : i + 1], keys[None, :, : start + i + 1], values[None, :, : start + i + 1],
                    enable_gqa=True,
                )[0]  # [H, 1, hd]
                for i in range(k)
            ]
            out = rows[0] if k == 1 else torch.cat(rows, dim=1)  # [H, k, hd]
        else:
            end = start + k
            allowed = torch.arange(end, device=q.device)[None] <= torch.arange(start, end, device=q.device)[:, None]
            out = F.scaled_dot_product_attention(
                q[None], keys[None, :, :end], values[None, :, :end], attn_mask=allowed, enable_gqa=True
            )[0]
        return out.transpose(0, 1).reshape(k, heads * hd)
