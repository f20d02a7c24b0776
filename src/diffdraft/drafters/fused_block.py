"""The block-diffusion drafter's layers as one call of the fused C++ layer stack (backends/fused.py), on 4-bit
copies of its weights (docs/native-weights.md, "The fused drafter").

Used where the target runs its own layers fused (a 4-bit target on the CPU): a drafter call then costs its
matmuls plus microseconds instead of some thirty PyTorch ops per layer. The drafter's linears are rounded
once to 4-bit groups of 32 (round to nearest); the drafted tokens' q is the law of this rounded network,
computed with them, so verification stays exact. The block's rows see the cached context and each other
(no causal mask); the op writes the block's own keys and values into the context cache's slots past the
committed tokens, which are scratch until those tokens are committed. Keys live in rotary-pair order there
(KEY_ORDER), the op's layout. Knows nothing of the engine, of heads or of how context features are made.
"""

from __future__ import annotations

import torch

from diffdraft.backends import fused as fused_kernels
from diffdraft.backends.int4 import round_to_nearest
from diffdraft.backends.kernels import Int4Linear, int4_fits
from diffdraft.models.block_diffusion import BlockDiffusionNet
from diffdraft.rope import paired_rows, rope_phases, rope_tables


class FusedBlockLayers:
    """A BlockDiffusionNet's layers (not its fuse, norm or head) as a FusedStack. Weights only: no request's state."""

    def __init__(self, net: BlockDiffusionNet, op, max_positions: int):
        """max_positions: the furthest position a block row may take (the context cache's capacity)."""
        cfg = net.cfg
        heads, kv_heads, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        q_order, k_order = paired_rows(heads, hd), paired_rows(kv_heads, hd)
        linears, norms = [], []
        for layer in net.layers:
            keys, values = layer.kv_proj.weight.detach().float().split(kv_heads * hd)  # kv_proj: keys, then values
            qkv = torch.cat([layer.q_proj.weight.detach().float()[q_order], keys[k_order], values])
            for weight in (qkv, layer.o_proj.weight, layer.gate_up.weight, layer.down.weight):
                linears.append(Int4Linear(round_to_nearest(weight.detach().float())))
            norms.append((layer.attn_norm.weight.detach(), layer.mlp_norm.weight.detach()))
        self.stack = fused_kernels.FusedStack.of(op, norms, linears, heads, kv_heads, hd, cfg.rms_eps)
        cos, sin = rope_tables(torch.arange(max_positions), hd, cfg.rope_theta)
        self.pairs = torch.view_as_real(rope_phases(cos, sin)).contiguous()  # [P, hd / 2, 2] each row's (cos, sin)
        self._everyone: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # g -> (seen, offsets): all see all

    @staticmethod
    def fits(net: BlockDiffusionNet) -> bool:
        """Whether the op can run this network: no q/k norms (DFlash's), and shapes the int4 kernel takes."""
        cfg = net.cfg
        d, q_width, kv_width = cfg.hidden_size, cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        shapes = ((q_width + 2 * kv_width, d), (d, q_width), (2 * cfg.intermediate_size, d),
                  (d, cfg.intermediate_size))  # (outputs, inputs) of qkv, o, gate/up, down
        return not cfg.qk_norm and cfg.head_dim % 2 == 0 and all(int4_fits(*shape) for shape in shapes)

    def key_order(self) -> torch.Tensor:
        """[hd]: the order in which one head's key columns sit in the cache (each rotary pair side by side)."""
        return paired_rows(1, self.stack.head_dim)

    def run(self, block: torch.Tensor, cache: torch.Tensor, start: int) -> torch.Tensor:
        """block [g, D] (inputs at positions start..start+g-1) -> hidden states [g, D] after the layers (no final
        norm). cache [L, 2, Hkv, C, hd] float32 holds the context's keys (pair order) and values in slots
        0..start-1; slots start..start+g-1 are overwritten."""
        g = block.shape[0]
        if g not in self._everyone:
            self._everyone[g] = (torch.arange(g).repeat(g), torch.arange(0, g * g + 1, g))
        seen, offsets = self._everyone[g]
        x = block.float().contiguous().clone()  # updated in place by the op
        self.stack.run(x, [cache], [g], [start], [0], seen, offsets, self.pairs[start : start + g])
        return x


def fused_block_layers(net: BlockDiffusionNet, target) -> tuple[FusedBlockLayers | None, str]:
    """(the fused layers for a drafter over `target`, "") where they run, else (None, why not)."""
    if not target.fused_layers:
        return None, "its target's layers run in Python"
    if not FusedBlockLayers.fits(net):
        return None, "its network has q/k norms or shapes the int4 kernel does not take"
    op, why = fused_kernels.fused_layers()
    if op is None:
        return None, why
    return FusedBlockLayers(net, op, target.max_context + net.cfg.block_size), ""
