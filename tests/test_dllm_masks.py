"""Attention masks of the dLLM, on small enumerated cases.

The SimSD rule under test: in the verification forward, every row of state j (the copy of
the block after j drafted steps) sees exactly the cached context, the finished blocks not
yet cached, the block's committed tokens and the references revealed at steps < j (at
their own slots), plus MASK slots; nothing of any other state, so no reference revealed at
step >= j. It is checked twice: as sets read off the mask and the inputs, for every draft
order of small blocks; and as information flow through the real forward, where changing a
reference must leave every earlier state's logits bit-for-bit unchanged and change a later one.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from conftest import make_llama
from diffdraft.dllm.cache import KVCache
from diffdraft.dllm.masks import (
    causal_mask,
    finished_then,
    reveal_labels,
    segment_mask,
    simsd_layout,
    state_ids,
    training_mask,
)
from diffdraft.dllm.model import MASK_ID
from test_dllm_model import converted


def visible(mask: torch.Tensor, row: int) -> set[int]:
    return {int(k) for k in torch.nonzero(mask[0, 0, row]).flatten()}


def test_causal_and_segment_masks():
    assert causal_mask(2, 3)[0, 0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    m = segment_mask(1, [2, 1, 2], [[], [0], []])[0, 0].int().tolist()
    assert m == [
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 0, 0, 0, 1, 1],
        [1, 0, 0, 0, 1, 1],
    ]
    with pytest.raises(ValueError):
        segment_mask(0, [1, 1], [[1], []])  # only earlier segments
    # a step: one finished block not yet cached, then the block; the block sees it, it does not see the block
    step = finished_then(3, 1, 2, [2])
    assert visible(step, 0) == {0, 1, 2, 3, 4} and visible(step, 3) == {0, 1, 2, 3, 4, 5, 6}


def test_training_mask_enumerated():
    # prompt of 2, two blocks of 2: clean [p0 p1 | c0 c1 | c2 c3] (6) + noisy [n0 n1 | n2 n3] (4), one pad column each
    m = training_mask(prompt_len=2, num_blocks=2, block_size=2, clean_width=7, noisy_width=5)
    rows = {i: {int(k) for k in torch.nonzero(m[i]).flatten()} for i in range(12)}
    assert rows[0] == {0} and rows[1] == {0, 1}  # prompt: causal
    assert rows[2] == rows[3] == {0, 1, 2, 3}  # clean block 0: prompt + itself
    assert rows[4] == rows[5] == {0, 1, 2, 3, 4, 5}  # clean block 1: prompt, clean block 0, itself
    assert rows[7] == rows[8] == {0, 1, 7, 8}  # noisy block 0: prompt + itself, never its clean copy
    assert rows[9] == rows[10] == {0, 1, 2, 3, 9, 10}  # noisy block 1: prompt + clean block 0 + itself
    assert rows[6] == {6} and rows[11] == {11}  # padding sees only itself


def all_drafts(block_ids: list[int], counts: list[int]):
    """Every way to reveal the masked slots of block_ids in steps of `counts` slots."""
    masked = [i for i, t in enumerate(block_ids) if t == MASK_ID]

    def split(slots, counts):
        if not counts:
            yield []
            return
        for first in itertools.combinations(slots, counts[0]):
            rest = [s for s in slots if s not in first]
            for tail in split(rest, counts[1:]):
                yield [first] + tail

    assert sum(counts) <= len(masked)
    yield from split(masked, counts)


CASES = [
    # (block with committed tokens, slots per drafted step, finished blocks not yet cached)
    ([MASK_ID] * 3, [1, 1, 1], 0),
    ([MASK_ID] * 3, [1, 1], 1),
    ([MASK_ID, 71, MASK_ID, MASK_ID], [1, 2], 1),
    ([MASK_ID] * 4, [2, 1], 2),
    ([70, MASK_ID, MASK_ID, MASK_ID], [1, 1, 1], 0),
]


@pytest.mark.parametrize("block, counts, num_finished", CASES)
def test_every_state_sees_exactly_context_finished_and_earlier_references(block, counts, num_finished):
    b, cache_len, start = len(block), 5, 20
    finished = [[90 + i * b + k for k in range(b)] for i in range(num_finished)]
    for order in all_drafts(block, counts):
        labels = reveal_labels(block, order)
        draft = [t if t != MASK_ID else 100 + i for i, t in enumerate(block)]  # reference token at slot i: 100 + i
        layout = simsd_layout(cache_len, finished, start, block, draft, labels, len(order))
        ids, pos = layout.ids[0].tolist(), layout.positions[0].tolist()
        fin_cols = set(range(cache_len, cache_len + b * num_finished))
        assert ids[: b * num_finished] == [t for blk in finished for t in blk]
        assert pos[: b * num_finished] == list(range(start - b * num_finished, start))
        for j, rows in enumerate(layout.states + ([] if layout.final_clean else [layout.final])):
            expected_refs = {(start + i, draft[i]) for i in range(b) if labels[i] < j and block[i] == MASK_ID}
            committed = {(start + i, t) for i, t in enumerate(block) if t != MASK_ID}
            for row in range(rows.start, rows.stop):
                keys = visible(layout.mask, row)
                assert set(range(cache_len)) <= keys and fin_cols <= keys  # the context and finished blocks
                others = keys - set(range(cache_len)) - fin_cols
                seen = {(pos[k - cache_len], ids[k - cache_len]) for k in others}
                tokens = {s for s in seen if s[1] != MASK_ID}
                assert tokens == expected_refs | committed, (order, j)
                masks_seen = {p for p, t in seen if t == MASK_ID}
                assert masks_seen == {start + i for i in range(b) if labels[i] >= j}  # the still-masked slots
                assert pos[row] in range(start, start + b)  # positions copied from the slots
        if layout.final_clean is not None:  # the filled block, clean, then the next block's first step
            clean = layout.final_clean
            assert ids[clean.start : clean.stop] == draft and pos[clean.start : clean.stop] == list(range(start, start + b))
            for row in range(layout.final.start, layout.final.stop):
                keys = visible(layout.mask, row)
                cols = set(range(cache_len)) | fin_cols | {cache_len + k for k in range(clean.start, clean.stop)}
                assert keys == cols | {cache_len + k for k in range(layout.final.start, layout.final.stop)}
            assert pos[layout.final.start : layout.final.stop] == list(range(start + b, start + 2 * b))
            assert ids[layout.final.start : layout.final.stop] == [MASK_ID] * b


def test_reveal_labels_and_state_ids():
    block = [MASK_ID, 5, MASK_ID, MASK_ID]
    labels = reveal_labels(block, [(2,), (0,)])
    assert labels == [1, -1, 0, 2]  # slot 3 is not drafted: still masked after the draft
    draft = [10, 5, 12, 13]
    assert state_ids(block, draft, labels, 0) == [MASK_ID, 5, MASK_ID, MASK_ID]
    assert state_ids(block, draft, labels, 1) == [MASK_ID, 5, 12, MASK_ID]
    assert state_ids(block, draft, labels, 2) == [10, 5, 12, MASK_ID]
    with pytest.raises(ValueError):
        reveal_labels(block, [(1,)])  # slot 1 is committed already
    with pytest.raises(ValueError):
        reveal_labels(block, [(0,), (0,)])  # revealed twice


def test_information_flow_through_the_forward():
    """Changing the reference revealed at step k changes states > k only; states <= k are bit-identical."""
    net = converted(make_llama(init_range=0.2), block_size=4)
    prompt = torch.tensor([[4, 8, 15, 16, 23]])
    _, kv = net(prompt, torch.arange(5)[None], causal_mask(0, 5))
    cache = KVCache()
    cache.append(kv, slice(None))
    finished = [[42, 43, 44, 45]]
    block = [MASK_ID] * 4
    order = [(2,), (0,), (3,), (1,)]
    labels = reveal_labels(block, order)

    def state_logits(draft):
        layout = simsd_layout(cache.length, finished, 9, block, draft, labels, 4)
        hidden, _ = net(layout.ids, layout.positions, layout.mask, cache)
        return [net.logits(hidden[0, r]) for r in layout.states + [layout.final]]

    base = state_logits([30, 31, 32, 33])
    for k, (slot,) in enumerate(order):
        draft = [30, 31, 32, 33]
        draft[slot] = 99
        changed = state_logits(draft)
        for j in range(len(base)):
            same = torch.equal(changed[j], base[j])
            assert same == (j <= k), (k, j)
