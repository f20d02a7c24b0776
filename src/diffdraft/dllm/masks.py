"""Attention masks of the block-diffusion model, as pure functions of sizes and labels.

Every forward's keys are [cached tokens | new tokens]; a mask is [B, 1, T, C+T] bool with
True = may attend. The new tokens are cut into *segments*; each segment sees every cached
token, itself bidirectionally, and the earlier segments it is told to see. That one rule
covers the prompt (causal, built separately), a decoding step ([finished blocks not yet
cached | the block being denoised]), and the SimSD verification forward, whose layout is
built by `simsd_layout` (see simsd.py for how it is used):

    [finished blocks not yet cached | state 0 | state 1 | ... | state S-1 | final state]

State j is a full copy of the block as the target would see it after j drafted steps:
committed tokens and the references revealed at steps < j hold their tokens, every other
slot holds MASK; positions are copied from the slots they stand for. A state sees the
cache and the finished blocks, and nothing of any other state, so no reference revealed
at step >= j can reach it. The final state is either one more such copy, or, when the draft
fills the block, [the filled block, clean | the next block, all MASK]: the next block's
first step, seeing the filled block as a finished one.
This module knows no model and no tokens beyond MASK_ID.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffdraft.dllm.model import MASK_ID


def causal_mask(cache_len: int, length: int) -> torch.Tensor:
    """New token i sees the cache and new tokens 0..i. -> [1, 1, T, C+T]."""
    rows = torch.ones(length, length, dtype=torch.bool).tril()
    return torch.cat([torch.ones(length, cache_len, dtype=torch.bool), rows], dim=1)[None, None]


def segment_mask(cache_len: int, sizes: list[int], sees: list[list[int]]) -> torch.Tensor:
    """Segment i sees the cache, itself, and the segments in sees[i] (earlier ones). -> [1, 1, T, C+T]."""
    if len(sizes) != len(sees):
        raise ValueError("one 'sees' list per segment")
    seg = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes, dtype=torch.long))  # [T]
    visible = torch.eye(len(sizes), dtype=torch.bool)  # [S, S] segment i sees segment j
    for i, others in enumerate(sees):
        if any(not 0 <= j < i for j in others):
            raise ValueError(f"segment {i} may only see earlier segments, got {others}")
        visible[i, others] = True
    rows = visible[seg][:, seg]  # [T, T]
    return torch.cat([torch.ones(len(seg), cache_len, dtype=torch.bool), rows], dim=1)[None, None]


def finished_then(cache_len: int, num_finished: int, block_size: int, tail: list[int]) -> torch.Tensor:
    """[num_finished blocks not yet cached | segments of sizes `tail`]: every segment sees all finished blocks.

    Finished blocks see the earlier finished blocks; tail segments see only the finished
    blocks (and themselves). -> [1, 1, T, C+T].
    """
    sizes = [block_size] * num_finished + list(tail)
    sees = [list(range(i)) for i in range(num_finished)] + [list(range(num_finished)) for _ in tail]
    return segment_mask(cache_len, sizes, sees)


def training_mask(prompt_len: int, num_blocks: int, block_size: int, clean_width: int, noisy_width: int) -> torch.Tensor:
    """One training sequence [clean tokens (clean_width) | noisy blocks (noisy_width)]. -> [T, T] bool.

    Clean prompt tokens are causal. Clean block i (response tokens) sees the prompt, the
    clean blocks before it and itself. Noisy block i sees the prompt, the clean blocks
    before it and itself; never its own clean copy. Padding rows see only themselves.
    """
    b, p = block_size, prompt_len
    real_clean = p + num_blocks * b
    if real_clean > clean_width or num_blocks * b > noisy_width:
        raise ValueError("the sequence does not fit the widths")
    width = clean_width + noisy_width
    mask = torch.eye(width, dtype=torch.bool)
    q = torch.arange(clean_width)
    k = torch.arange(clean_width)
    block_end = torch.where(q < p, q + 1, p + ((q - p) // b + 1) * b)  # exclusive key limit per clean row
    clean = (k[None, :] < block_end[:, None]) & (q[:, None] < real_clean)
    mask[:clean_width, :clean_width] |= clean
    j = torch.arange(num_blocks * b)
    block = j // b
    mask[clean_width + j[:, None], k[None, :]] = k[None, :] < (p + block * b)[:, None]  # clean context
    same = block[:, None] == block[None, :]
    mask[clean_width : clean_width + num_blocks * b, clean_width : clean_width + num_blocks * b] = same
    return mask


@dataclass
class Layout:
    """The SimSD verification forward: its inputs, mask and where each state's rows are."""

    ids: torch.Tensor  # [1, T] int64, MASK_ID in masked slots
    positions: torch.Tensor  # [1, T] int64
    mask: torch.Tensor  # [1, 1, T, C+T] bool
    finished: slice  # rows of the finished blocks not yet cached
    states: list[slice]  # rows of the block in state j (j = 0..S-1), b rows each
    final: slice  # rows giving the final state's decision (b rows)
    final_clean: slice | None  # rows of the filled block (clean) when the draft fills it, else None


def reveal_labels(block_ids: list[int], draft_positions: list[tuple[int, ...]]) -> list[int]:
    """Per slot: -1 if committed already, j if the draft reveals it at step j, S if still masked after the draft."""
    labels = [-1 if t != MASK_ID else len(draft_positions) for t in block_ids]
    for step, positions in enumerate(draft_positions):
        for p in positions:
            if labels[p] != len(draft_positions):
                raise ValueError(f"slot {p} is revealed twice or was committed already")
            labels[p] = step
    return labels


def state_ids(block_ids: list[int], draft_tokens: list[int], labels: list[int], state: int) -> list[int]:
    """The block as the target sees it after `state` drafted steps: references with label < state, else MASK."""
    return [
        committed if label < 0 else (token if label < state else MASK_ID)
        for committed, token, label in zip(block_ids, draft_tokens, labels)
    ]


def simsd_layout(
    cache_len: int,
    finished: list[list[int]],  # finished blocks not yet in the cache, b tokens each, in order
    block_start: int,  # position of the block's slot 0
    block_ids: list[int],  # [b] committed tokens, MASK_ID where still masked
    draft_tokens: list[int],  # [b] drafted token per slot (ignored where committed or undrafted)
    labels: list[int],  # [b] from reveal_labels
    num_steps: int,  # S, drafted steps
) -> Layout:
    """Inputs and mask of one verification forward over S drafted steps (see the module docstring)."""
    b, n = len(block_ids), len(finished)
    ids: list[int] = [t for block in finished for t in block]
    positions: list[int] = list(range(block_start - b * n, block_start))
    slots = list(range(block_start, block_start + b))
    sizes = [b] * n
    sees = [list(range(i)) for i in range(n)]
    states = []
    for j in range(num_steps + 1):  # state num_steps is the final one
        rows = slice(len(ids), len(ids) + b)
        ids += state_ids(block_ids, draft_tokens, labels, j)
        positions += slots
        sizes.append(b)
        sees.append(list(range(n)))
        states.append(rows)
    final, final_clean = states.pop(), None
    if all(label < num_steps for label in labels):  # the draft fills the block: decide the next block's step 0
        final_clean, final = final, slice(len(ids), len(ids) + b)
        ids += [MASK_ID] * b
        positions += list(range(block_start + b, block_start + 2 * b))
        sizes.append(b)
        sees.append(list(range(n)) + [len(sizes) - 2])
    mask = segment_mask(cache_len, sizes, sees)
    return Layout(
        ids=torch.tensor([ids], dtype=torch.long),
        positions=torch.tensor([positions], dtype=torch.long),
        mask=mask,
        finished=slice(0, b * n),
        states=states,
        final=final,
        final_clean=final_clean,
    )
