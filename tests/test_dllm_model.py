"""The block-diffusion model's forward over HF Llama weights: exact where it must equal HF.

Also home of `converted`, the tiny "converted" dLLM the other test_dllm_* files use: a
seeded tiny Llama with non-zero random adapters and a random mask embedding, so that the
adapters and the mask slot are really exercised (a zero adapter could hide a bug).
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from diffdraft.dllm.cache import KVCache
from diffdraft.dllm.masks import causal_mask
from diffdraft.dllm.model import MASK_ID, BlockDiffusionLM, DLLMConfig
from diffdraft.errors import DiffdraftError


def converted(base, block_size: int, num_layers: int | None = None, seed: int = 1, adapter_std: float = 0.05,
              rank: int = 4) -> BlockDiffusionLM:
    """A BlockDiffusionLM over `base` with seeded random adapters (B != 0) and mask embedding, eval mode."""
    net = BlockDiffusionLM(base, DLLMConfig(block_size=block_size, num_layers=num_layers, rank=rank))
    gen = torch.Generator().manual_seed(seed)
    net.reset_parameters(gen)
    with torch.no_grad():
        for b in net.adapters.b.values():
            b.normal_(0.0, adapter_std, generator=gen)
        net.mask_embedding.normal_(0.0, 1.0, generator=gen)
    return net.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def peaked_model():
    """A tiny Llama with larger weights than the default, so its logits are far from uniform."""
    return make_llama(init_range=0.2)


def test_forward_equals_hf_with_fresh_adapters(peaked_model):
    net = BlockDiffusionLM(peaked_model, DLLMConfig(block_size=4))
    net.reset_parameters(torch.Generator().manual_seed(0))  # B = 0: no change to the base model
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    expected = peaked_model(input_ids=ids).logits  # [1, 12, V]
    hidden, kv = net(ids, torch.arange(12)[None], causal_mask(0, 12))
    assert torch.equal(net.logits(hidden), expected)
    # the same through the cache: 7 tokens cached, 5 more (a linear over 5 rows may round apart from
    # one over 12 with some thread settings, as F.linear does: equal to float32 rounding, not bit for bit)
    cache = KVCache()
    cache.append(kv, slice(0, 7))
    hidden, _ = net(ids[:, 7:], torch.arange(7, 12)[None], causal_mask(7, 5), cache)
    torch.testing.assert_close(net.logits(hidden), expected[:, 7:], rtol=0, atol=1e-5)


def test_fresh_conversion_predicts_slot_zero_as_the_ar_model(peaked_model):
    """The token shift: slot 0 of a block is read from the last context position, so with zero
    adapter updates the first block's slot 0 is the AR model's next-token prediction after the
    prompt, whatever the mask embedding. (After a finished block it is not exactly: that block
    was read bidirectionally.)"""
    from diffdraft.dllm.decode import BlockState, Session

    net = BlockDiffusionLM(peaked_model, DLLMConfig(block_size=3))
    net.reset_parameters(torch.Generator().manual_seed(0))
    with torch.no_grad():
        net.mask_embedding.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(1))
    prompt = [5, 9, 33, 100]
    session = Session(net)
    first = session.begin(prompt, 6)
    expected = peaked_model(input_ids=torch.tensor([prompt])).logits[0]  # [4, V]
    unshifted = net.logits(net(torch.tensor([prompt + [MASK_ID] * 3]), torch.arange(7)[None],
                               causal_mask(0, 7))[0])[0, 4]  # what the slot's own row would say
    assert not torch.allclose(unshifted, expected[3], atol=1e-3)
    assert torch.allclose(session.block_logits(first)[0], expected[3], atol=1e-5)
    # a slot whose predecessor is revealed and the rest masked is not the AR prediction: the masks are read
    half = session.block_logits(BlockState(start=4, ids=(3, MASK_ID, MASK_ID)))
    assert not torch.allclose(half[1], peaked_model(input_ids=torch.tensor([prompt + [3]])).logits[0, -1], atol=1e-3)


def test_adapters_and_mask_embedding_change_the_output(peaked_model):
    net = converted(peaked_model, 4)
    ids = torch.tensor([[3, 50, 7, MASK_ID, MASK_ID]])
    positions = torch.arange(5)[None]
    hidden, _ = net(ids, positions, causal_mask(0, 5))
    plain = peaked_model(input_ids=ids.clamp(min=0)).logits
    assert not torch.allclose(net.logits(hidden), plain, atol=1e-3)
    # the mask slot really reads the mask embedding
    with torch.no_grad():
        net.mask_embedding.add_(1.0)
    moved, _ = net(ids, positions, causal_mask(0, 5))
    assert torch.equal(moved[0, :3], hidden[0, :3]) and not torch.allclose(moved[0, 3:], hidden[0, 3:])


def test_drafter_depth_uses_first_layers(peaked_model):
    body = peaked_model.model
    net = BlockDiffusionLM(peaked_model, DLLMConfig(block_size=4, num_layers=2))
    net.reset_parameters(torch.Generator().manual_seed(0))
    ids = torch.tensor([[1, 2, 3]])
    hidden, kv = net(ids, torch.arange(3)[None], causal_mask(0, 3))
    assert len(kv) == 2
    out = body(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(hidden, body.norm(out.hidden_states[2]), atol=1e-6)
    assert len(net.adapters.a) == 2 * 7
    with pytest.raises(DiffdraftError):
        BlockDiffusionLM(peaked_model, DLLMConfig(block_size=4, num_layers=9))


@pytest.mark.parametrize("bad", [{"block_size": 0}, {"rank": 0}, {"num_layers": 0}, {"targets": ("qk",)}])
def test_bad_config_refused(peaked_model, bad):
    with pytest.raises(DiffdraftError):
        BlockDiffusionLM(peaked_model, DLLMConfig(**{"block_size": 4, **bad}))


def test_base_weights_are_not_parameters(peaked_model):
    net = converted(peaked_model, 4)
    names = set(net.state_dict())
    assert "mask_embedding" in names and all(n == "mask_embedding" or n.startswith("adapters.") for n in names)


def test_adapter_init_is_drawn_where_the_generator_lives(peaked_model):
    # On the H100 the adapters live on CUDA while the trainer's generator is a CPU one:
    # A is drawn from the generator's own stream and copied, the same A on every device.
    net = BlockDiffusionLM(peaked_model, DLLMConfig(block_size=4, rank=4))
    net.reset_parameters(torch.Generator().manual_seed(3))
    stream = torch.Generator().manual_seed(3)
    for key, a in net.adapters.a.items():
        expected = torch.randn(a.shape, generator=stream) / a.shape[1] ** 0.5  # [rank, in]
        assert torch.equal(a, expected), key
        assert not net.adapters.b[key].any()
