"""The dLLM's forwards on the lean runtime (diffdraft.dllm.runtime): adapters merged into the weights, the
mask embedding as one more embedding row, a segment mask as rows that see their block; what it computes
equals the module's up to rounding, and its decoding gives the module's tokens. Tiny random Llamas."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llama
from diffdraft.dllm.decode import BlockState, Session, decode
from diffdraft.dllm.loading import dllm_runtime
from diffdraft.dllm.lora import base_linear
from diffdraft.dllm.masks import finished_then
from diffdraft.dllm.model import MASK_ID
from diffdraft.dllm.runtime import LeanBlocks, ModuleBlocks, blocks_for
from diffdraft.errors import DiffdraftError
from diffdraft.rope import paired_rows
from test_dllm_model import converted

PROMPT = [5, 9, 33, 100, 7]


@pytest.fixture(scope="module")
def net():
    return converted(make_llama(init_range=0.2), 4, seed=1, adapter_std=0.2)


def test_the_lean_runtime_reads_the_adapters_beside_the_weights(net, tiny_tokenizer):
    """Every adapted projection's update B A is in the lean layer's kernel (x A^T B^T beside x W^T), the mask
    embedding is embedding row V, and the net's own weights are untouched."""
    before = {name: p.clone() for name, p in net.base.named_parameters()}
    blocks = LeanBlocks(net, tiny_tokenizer)
    assert all(torch.equal(before[name], p) for name, p in net.base.named_parameters())
    assert blocks.mask_id == net.vocab_size
    assert torch.equal(blocks.target._embed[blocks.mask_id], net.mask_embedding)
    x = torch.randn(3, net.base.config.hidden_size, generator=torch.Generator().manual_seed(2))
    layer = blocks.target._layers[0].rowwise.qkv
    base = net.base.model.layers[0].self_attn
    config = net.base.config
    head_dim = config.hidden_size // config.num_attention_heads
    orders = {"q": paired_rows(config.num_attention_heads, head_dim), "k": paired_rows(config.num_key_value_heads,
                                                                                         head_dim)}
    expected = torch.cat([net.adapters.apply(0, name, base_linear(net.base.model.layers[0], name), x)[
        :, orders.get(name, slice(None))] for name in ("q", "k", "v")], dim=-1)  # q, k rows as the runtime pairs them
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    unadapted = torch.cat([base.q_proj(x)[:, orders["q"]], base.k_proj(x)[:, orders["k"]], base.v_proj(x)], -1)
    assert not torch.allclose(layer(x), unadapted, atol=1e-3)
    with pytest.raises(DiffdraftError, match="layers"):
        LeanBlocks(converted(net.base, 4, num_layers=2), tiny_tokenizer)


def test_lean_logits_equal_the_modules_up_to_rounding(net, tiny_tokenizer):
    """A prefill, then a forward carrying a finished block and a half-masked block, then one after keeping
    the finished block: every row's logits on both runtimes."""
    sessions = [Session(ModuleBlocks(net)), Session(LeanBlocks(net, tiny_tokenizer))]
    outputs = []
    for session in sessions:
        first = session.begin(PROMPT, 12)
        rows = [session.before]
        session.finish((3, 4, 5, 6))
        rows.append(session.block_logits(BlockState(start=first.start + 4, ids=(MASK_ID, 8, MASK_ID, MASK_ID))))
        rows.append(session.block_logits(BlockState(start=first.start + 4, ids=(9, MASK_ID, MASK_ID, 2))))
        assert session.length == len(PROMPT) + 4
        outputs.append(torch.cat([r.reshape(-1, net.vocab_size) for r in rows]))
    module, lean = outputs
    assert not torch.equal(module, torch.zeros_like(module))
    torch.testing.assert_close(lean, module, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("steps", [4, 2])
def test_lean_decoding_gives_the_modules_tokens(net, tiny_tokenizer, steps):
    module = decode(net, PROMPT, steps, max_new_tokens=24)
    lean = decode(blocks_for(net, "lean", tiny_tokenizer), PROMPT, steps, max_new_tokens=24)
    assert lean.tokens == module.tokens and len(lean.tokens) == 24
    assert lean.forwards == module.forwards


def test_a_mask_that_hides_the_cache_is_refused_on_the_lean_runtime(net, tiny_tokenizer):
    session = Session(LeanBlocks(net, tiny_tokenizer))
    block = session.begin(PROMPT, 8)
    mask = finished_then(len(PROMPT), 0, 4, [4]).clone()
    mask[..., 0] = False  # the first cached token hidden from every row
    ids = torch.tensor([[MASK_ID] * 4])
    with pytest.raises(ValueError, match="whole cache"):
        session.run(ids, torch.arange(block.start, block.start + 4)[None], mask)


def test_the_runtime_follows_the_backend_choice(tiny_model):
    assert dllm_runtime("auto", tiny_model) == "lean"
    assert dllm_runtime("lean", tiny_model) == "lean"
    assert dllm_runtime("hf", tiny_model) == "module"
    tiny_model.config.model_type, kept = "gpt2", tiny_model.config.model_type
    try:
        assert dllm_runtime("auto", tiny_model) == "module"
        with pytest.raises(DiffdraftError, match="use --backend hf") as refused:
            dllm_runtime("lean", tiny_model)
        assert "\n" not in str(refused.value)
    finally:
        tiny_model.config.model_type = kept
    with pytest.raises(DiffdraftError, match="backend must be one of"):
        dllm_runtime("gpu", tiny_model)
    with pytest.raises(DiffdraftError, match="runtime must be one of"):
        blocks_for(None, "tpu")
