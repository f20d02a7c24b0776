"""The block-diffusion drafter over a fused 4-bit target (drafters/fused_block.py): its layers in one C++ call on
4-bit copies of its weights, close to its Python layers run on the same rounded weights (and far from them when
the keys' rotary-pair order is broken: the control), lossless through the engine at T = 0 and T = 1, its
blocks only as long as the tokens asked for, and the Python layers wherever the fused ones do not run."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import FIXED, make_llama
from diffdraft.backends import build_target
from diffdraft.backends.int4 import round_to_nearest
from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.drafters import BlockDiffusionDrafter
from diffdraft.drafters import fused_block
from diffdraft.engine import SpeculativeEngine
from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet
from lawcheck import fit

TAPS = (1, 3)


def int4_target(model, tokenizer, taps=TAPS, name="tiny"):
    return build_target(model, tokenizer, name=name, weights="int4", tap_layers=taps, report=lambda line: None)


def drafter_net(target, layers: int = 2, block: int = 6, seed: int = 0) -> BlockDiffusionNet:
    hf = target.module.config
    cfg = BlockDiffusionConfig(hidden_size=target.hidden_size, num_taps=len(target.tap_layers), num_layers=layers,
                               num_heads=hf.num_attention_heads, num_kv_heads=hf.num_key_value_heads,
                               head_dim=target.hidden_size // hf.num_attention_heads,
                               intermediate_size=hf.intermediate_size, block_size=block)
    net = BlockDiffusionNet(cfg)
    net.reset_parameters(torch.Generator().manual_seed(seed))
    with torch.no_grad():  # a visible mask embedding and sharp logits, so a broken path shows
        net.mask_embedding.normal_(generator=torch.Generator().manual_seed(seed + 1))
        net.norm.weight.mul_(4.0)
    return net


def rounded(net: BlockDiffusionNet) -> BlockDiffusionNet:
    """The network with every linear's weight replaced by its 4-bit rounding, in float32."""
    copied = copy.deepcopy(net)
    with torch.no_grad():
        for module in copied.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(round_to_nearest(module.weight).dequantize())
    return copied


def slot_logits(drafter, target, prompt: list[int], count: int) -> torch.Tensor:
    out = target.prefill(target.new_state(), torch.tensor([prompt[:-1]]), want_taps=True)
    state = drafter.new_state()
    drafter.begin(state, prompt[:-1], out.taps)
    return drafter.slot_logits(state, prompt, count)  # [count, V]


def test_the_fused_drafter_agrees_with_its_python_layers_on_the_rounded_weights(tiny_model, tiny_tokenizer,
                                                                                 monkeypatch):
    fused_target = int4_target(tiny_model, tiny_tokenizer)
    python_target = build_target(tiny_model, tiny_tokenizer, name="tiny", weights="int4", tap_layers=TAPS,
                                 fused=False, report=lambda line: None)
    assert fused_target.fused_layers and not python_target.fused_layers
    net = drafter_net(fused_target)
    fused = BlockDiffusionDrafter(fused_target, net, TAPS)
    python = BlockDiffusionDrafter(python_target, rounded(net), TAPS)
    assert fused.fused_layers and not python.fused_layers and python.fused_note
    prompt = list(range(20, 60))
    for count in (1, 3, 5):
        ours, theirs = slot_logits(fused, fused_target, prompt, count), slot_logits(python, python_target, prompt, count)
        gap = float((ours - theirs).abs().max())
        assert gap < 0.05 * float(theirs.abs().max()), (count, gap)  # bfloat16 activations and scales
    # the control: keys cached in the plain order while the fused layers rotate pairs gives other logits
    monkeypatch.setattr(fused, "_key_order", None)
    broken = slot_logits(fused, fused_target, prompt, 3)
    theirs = slot_logits(python, python_target, prompt, 3)
    assert float((broken - theirs).abs().max()) > 4 * gap


def test_a_block_holds_only_the_masks_asked_for(tiny_model, tiny_tokenizer):
    """Slot i's logits come from the block [last token, MASK x count]: asking for fewer slots changes the
    earlier slots' logits (the block attends to itself both ways), on both kinds of layers."""
    for fused in (True, False):
        target = build_target(tiny_model, tiny_tokenizer, name="tiny", weights="int4", tap_layers=TAPS, fused=fused,
                              report=lambda line: None)
        drafter = BlockDiffusionDrafter(target, drafter_net(target), TAPS)
        prompt = list(range(20, 40))
        short, long = slot_logits(drafter, target, prompt, 2), slot_logits(drafter, target, prompt, 5)
        assert short.shape[0] == 2 and long.shape[0] == 5
        assert not torch.allclose(short, long[:2])
        if not fused:  # the block of 3 rows by hand, through the prepared network on the same context
            net = drafter.net
            state = drafter.new_state()
            out = target.prefill(target.new_state(), torch.tensor([prompt[:-1]]), want_taps=True)
            drafter.begin(state, prompt[:-1], out.taps)
            known = target.embed_tokens(torch.tensor([[prompt[-1]]]))
            block = net.block_inputs(known, net.mask_vector(target.embed_tokens), size=3)
            positions = torch.arange(len(prompt) - 1, len(prompt) + 2)[None]
            context = [state.layer(i) for i in range(net.cfg.num_layers)]
            with torch.no_grad():
                hidden = drafter._fast(block, positions, context, mask=None)[0, 1:]
            torch.testing.assert_close(drafter.head.logits(hidden).float(), short)


@pytest.mark.parametrize("draft_len", [1, 3, 5])
def test_greedy_with_the_fused_drafter_equals_plain_decoding(tiny_model, tiny_tokenizer, draft_len):
    target = int4_target(tiny_model, tiny_tokenizer)
    drafter = BlockDiffusionDrafter(target, drafter_net(target), TAPS)
    assert drafter.fused_layers
    prompt = tiny_tokenizer("The quick brown fox")["input_ids"]
    plain = SpeculativeEngine(target, None).generate(prompt, 40)
    spec = SpeculativeEngine(target, drafter, DraftConfig(draft_len, **FIXED)).generate(prompt, 40)
    assert spec.tokens == plain.tokens


def test_the_fused_drafter_keeps_the_sampling_law():
    """T = 1, rejection sampling with the fused drafter's q: the first 3 tokens follow the 4-bit target's law
    computed by enumeration (chi-square, alpha 1e-4, N = 600 seeded runs)."""
    from test_engine import LAW_PROMPT, VOCAB_SMALL, engine_samples, exact_law

    model = make_llama(vocab_size=VOCAB_SMALL, layers=3, hidden=32, heads=2, kv_heads=1, max_positions=64,
                       eos_token_id=None, init_range=0.2, seed=1)
    target = int4_target(model, None, taps=(1, 2), name="tiny-vocab")
    target.tokenizer_fingerprint = lambda: "none"
    drafter = BlockDiffusionDrafter(target, drafter_net(target, layers=1), (1, 2))
    assert drafter.fused_layers
    sampling = SamplingConfig(temperature=1.0)
    samples, accepted = engine_samples(SpeculativeEngine(target, drafter, DraftConfig(3, **FIXED), sampling), 600)
    result = fit(samples, exact_law(target, LAW_PROMPT, sampling, backend=True))
    assert result.ok, str(result)
    assert 0 in accepted and max(accepted) >= 2


def test_where_the_fused_layers_do_not_run_the_python_ones_do(tiny_model, tiny_tokenizer, monkeypatch):
    float_target = build_target(tiny_model, tiny_tokenizer, name="tiny", tap_layers=TAPS, report=lambda line: None)
    drafter = BlockDiffusionDrafter(float_target, drafter_net(float_target), TAPS)
    assert not drafter.fused_layers and "Python" in drafter.fused_note
    target = int4_target(tiny_model, tiny_tokenizer)
    with_norms = drafter_net(target)
    with_norms.cfg = BlockDiffusionConfig(**{**with_norms.cfg.to_dict(), "qk_norm": True})
    assert not fused_block.FusedBlockLayers.fits(with_norms)
    monkeypatch.setattr(fused_block.fused_kernels, "fused_layers", lambda: (None, "no compiler here"))
    drafter = BlockDiffusionDrafter(target, drafter_net(target), TAPS)
    assert not drafter.fused_layers and drafter.fused_note == "no compiler here"
    prompt = tiny_tokenizer("The quick brown fox")["input_ids"]
    plain = SpeculativeEngine(target, None).generate(prompt, 20)
    assert SpeculativeEngine(target, drafter, DraftConfig(3, **FIXED)).generate(prompt, 20).tokens == plain.tokens
