"""The row forward (target.Rows): rows of a draft tree in one forward, each bit-identical to a
one-token forward at its position, and commit_path keeping one path as if it had been decoded alone.

On the tiny random Llama (lean runtime, CPU; float32 weights, and 4-bit ones on the fused layers). The control: a tree row whose ancestors
are not what it sees (a row that sees a sibling) must differ.
"""

from __future__ import annotations

import pytest
import torch

from diffdraft.backends import build_target
from diffdraft.errors import DiffdraftError
from diffdraft.target import Rows

PROMPT = [5, 17, 33, 2, 41, 8, 19, 23]
# row 0 follows the committed prompt; rows 1-2 are its children, 3-4 children of 1, 5 of 2, 6 of 3
PARENTS = [-1, 0, 0, 1, 1, 2, 3]
TOKENS = [7, 11, 12, 13, 14, 15, 16]


@pytest.fixture(params=["float32", "int4"], ids=["float32", "int4-fused"])
def tiny_target(request, tiny_model, tiny_tokenizer):
    """The tiny Llama's rows on float32 weights (Python layers) and on 4-bit ones (the fused C++ layers)."""
    target = build_target(tiny_model, tiny_tokenizer, name="tiny", weights=request.param, report=lambda line: None)
    assert target.fused_layers == (request.param == "int4"), target.fused_note
    return target


def path_to(parents: list[int], row: int) -> list[int]:
    path = [row]
    while parents[path[0]] != -1:
        path.insert(0, parents[path[0]])
    return path


def one_token_logits(target, tokens: list[int]) -> torch.Tensor:
    """The prompt prefilled, then `tokens` fed one at a time: the last one's logits [V]."""
    state = target.new_state()
    target.prefill(state, torch.tensor([PROMPT]))
    for token in tokens:
        out = target.forward(state, torch.tensor([[token]]))
    return out.logits[0, -1]


def test_rows_from_parents():
    rows = Rows.tree(PARENTS)
    assert rows.depth == (0, 1, 1, 2, 2, 2, 3)
    assert rows.sees[6] == (0, 1, 3, 6) and rows.sees[5] == (0, 2, 5)
    assert Rows.tree([-1, 0, 1, 2]).is_chain and not rows.is_chain
    for bad in ([0], [-1, 1], [-1, 0, 5], [-1, "0"]):
        with pytest.raises(ValueError):
            Rows.tree(bad)


def test_every_tree_row_is_bit_identical_to_a_one_token_forward(tiny_target):
    target = tiny_target
    assert target.takes_trees
    state = target.new_state()
    target.prefill(state, torch.tensor([PROMPT]))
    logits = target.forward(state, torch.tensor([TOKENS]), rows=Rows.tree(PARENTS)).logits[0]  # [7, V]
    assert state.length == len(PROMPT) + len(TOKENS)
    for row in range(len(TOKENS)):
        alone = one_token_logits(target, [TOKENS[r] for r in path_to(PARENTS, row)])
        assert torch.equal(logits[row], alone), f"row {row}"


def test_the_control_a_row_that_sees_a_sibling_differs(tiny_target):
    target = tiny_target
    state = target.new_state()
    target.prefill(state, torch.tensor([PROMPT]))
    wrong = Rows(depth=(0, 1, 1), sees=((0,), (0, 1), (0, 1, 2)))  # row 2 sees its sibling 1 as an ancestor
    logits = target.forward(state, torch.tensor([TOKENS[:3]]), rows=wrong).logits[0]
    assert not torch.equal(logits[2], one_token_logits(target, [TOKENS[0], TOKENS[2]]))


@pytest.mark.parametrize("leaf", [6, 5, 4, 0])
def test_commit_path_leaves_the_cache_plain_decoding_would_have(tiny_target, leaf):
    target = tiny_target
    state = target.new_state()
    target.prefill(state, torch.tensor([PROMPT]))
    start = state.length
    target.forward(state, torch.tensor([TOKENS]), rows=Rows.tree(PARENTS))
    path = path_to(PARENTS, leaf)
    target.commit_path(state, start, path)
    assert state.length == start + len(path)

    plain = target.new_state()
    target.prefill(plain, torch.tensor([PROMPT]))
    target.forward(plain, torch.tensor([[TOKENS[r] for r in path]]))
    assert torch.equal(state.cache[:, :, :, : state.length], plain.cache[:, :, :, : plain.length])
    after = target.forward(state, torch.tensor([[3]])).logits[0, -1]
    assert torch.equal(after, target.forward(plain, torch.tensor([[3]])).logits[0, -1])


def test_a_large_tree_runs_as_one_masked_call(tiny_model, tiny_tokenizer):
    """Beyond invariant_rows the rows attend in one masked call: the same visibility, close values."""
    target = build_target(tiny_model, tiny_tokenizer, name="tiny")
    target.invariant_rows = 2
    state = target.new_state()
    target.prefill(state, torch.tensor([PROMPT]))
    logits = target.forward(state, torch.tensor([TOKENS]), rows=Rows.tree(PARENTS)).logits[0]
    for row in range(len(TOKENS)):
        alone = one_token_logits(target, [TOKENS[r] for r in path_to(PARENTS, row)])
        assert torch.allclose(logits[row], alone, atol=1e-4), f"row {row}"


def test_the_hf_backend_says_it_verifies_chains_only(tiny_model, tiny_tokenizer):
    target = build_target(tiny_model, tiny_tokenizer, backend="hf", name="tiny")
    state = target.new_state()
    target.prefill(state, torch.tensor([PROMPT]))
    with pytest.raises(DiffdraftError, match="chains only"):
        target.forward(state, torch.tensor([TOKENS]), rows=Rows.tree(PARENTS))
    target.forward(state, torch.tensor([TOKENS[:3]]), rows=Rows.tree([-1, 0, 1]))  # a chain is fine
