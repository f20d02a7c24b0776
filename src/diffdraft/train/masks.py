"""Training blocks: anchors, block inputs' positions, labels and the block attention mask.

A block at anchor a is [token a, MASK x (g-1)] at positions a..a+g-1; its labels are tokens
a+1..a+g-1; it sees the context features of positions strictly before a, and every position
of its own block (bidirectional), nothing of other blocks. Many blocks per sequence are
trained in one pass with this mask. Pure tensor code: knows no model.
"""

from __future__ import annotations

import torch

IGNORE = -100


def sample_anchors(
    lengths: torch.Tensor,  # [B] real tokens per sequence
    starts: torch.Tensor,  # [B] first allowed anchor (the response's first token)
    num_blocks: int,
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random distinct-when-possible anchors in [start, length-2]. Returns anchors [B, nb], valid [B, nb]."""
    batch = lengths.shape[0]
    anchors = torch.zeros(batch, num_blocks, dtype=torch.long)
    valid = torch.zeros(batch, num_blocks, dtype=torch.bool)
    for b in range(batch):
        low, high = int(starts[b]), int(lengths[b]) - 2  # need at least one label after the anchor
        span = high - low + 1
        if span <= 0:
            continue
        if span >= num_blocks:
            picks = torch.randperm(span, generator=generator)[:num_blocks] + low
            valid[b] = True
        else:
            picks = torch.arange(low, high + 1)
            picks = torch.cat([picks, torch.full((num_blocks - span,), low)])
            valid[b, :span] = True
        anchors[b] = picks.sort().values
    return anchors, valid


def block_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """anchors [B, nb] -> positions of every block slot [B, nb*g]."""
    offsets = torch.arange(block_size, device=anchors.device)
    return (anchors[:, :, None] + offsets).reshape(anchors.shape[0], -1)


def block_labels(tokens: torch.Tensor, lengths: torch.Tensor, anchors: torch.Tensor, valid: torch.Tensor,
                 block_size: int) -> torch.Tensor:
    """Labels of the masked slots: tokens a+1..a+g-1, IGNORE past the sequence end. -> [B, nb, g-1]."""
    offsets = torch.arange(1, block_size, device=anchors.device)
    where = anchors[:, :, None] + offsets  # [B, nb, g-1]
    inside = (where < lengths[:, None, None].to(where.device)) & valid[:, :, None]
    labels = tokens.gather(1, where.clamp(max=tokens.shape[1] - 1).reshape(tokens.shape[0], -1))
    labels = labels.reshape(where.shape)
    return labels.masked_fill(~inside, IGNORE)


def block_attention_mask(anchors: torch.Tensor, context_len: int, block_size: int) -> torch.Tensor:
    """Which keys each block slot may attend to. -> [B, 1, nb*g, C + nb*g] bool (True = attend).

    Keys are [context positions 0..C-1, then every block slot]. A slot of block j sees
    context positions < anchor_j and the slots of block j.
    """
    batch, nb = anchors.shape
    g = block_size
    device = anchors.device
    ctx_pos = torch.arange(context_len, device=device)  # [C]
    sees_ctx = ctx_pos[None, None, :] < anchors[:, :, None]  # [B, nb, C]
    sees_ctx = sees_ctx[:, :, None, :].expand(batch, nb, g, context_len).reshape(batch, nb * g, context_len)
    block_id = torch.arange(nb, device=device).repeat_interleave(g)  # [nb*g]
    sees_block = (block_id[:, None] == block_id[None, :]).expand(batch, nb * g, nb * g)
    return torch.cat([sees_ctx, sees_block], dim=-1)[:, None]


def prefix_and_blocks_mask(anchors: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Mask of one pass over [prefix of `length` tokens; nb blocks of g slots] (standalone drafter).

    Prefix rows are causal over the prefix and see no block; block rows are those of
    block_attention_mask (prefix positions < their anchor, their own block).
    -> [B, 1, L+nb*g, L+nb*g] bool.
    """
    batch, nb = anchors.shape
    causal = torch.ones(length, length, dtype=torch.bool, device=anchors.device).tril()
    prefix_rows = torch.cat([causal, causal.new_zeros(length, nb * block_size)], dim=-1)
    prefix_rows = prefix_rows.expand(batch, 1, length, length + nb * block_size)
    return torch.cat([prefix_rows, block_attention_mask(anchors, length, block_size)], dim=2)


def sample_block_masking(shape: tuple[int, ...], generator: torch.Generator | None) -> torch.Tensor:
    """Masked-diffusion corruption of block slots 1..g-1: [..., g-1] bool, True = masked.

    Each block draws a ratio r ~ U(0, 1) and masks each slot with probability r; at least
    one slot is always masked (a block with nothing to predict teaches nothing).
    """
    *lead, slots = shape
    ratio = torch.rand(*lead, 1, generator=generator)
    masked = torch.rand(*lead, slots, generator=generator) < ratio
    forced = torch.randint(0, slots, (*lead, 1), generator=generator)
    return masked.scatter(-1, forced, True)
