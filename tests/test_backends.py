"""Target backends (diffdraft.backends): the lean runtime's batch invariance, its agreement with
the HF path, the choice between them, and crop / prefill edge cases. Tiny random Llamas."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import MistralConfig, MistralForCausalLM, PreTrainedTokenizerFast

from conftest import make_llama
from diffdraft.backends import HFTarget, LeanLlamaTarget, build_target
from diffdraft.backends.kernels import onednn_bf16_supported
from diffdraft.config import DraftConfig
from diffdraft.drafters import NgramDrafter
from diffdraft.engine import SpeculativeEngine
from diffdraft.errors import DiffdraftError

MAX_K = 16
CONTEXT = 20


def k_token_vs_one_token(target, ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits [1, k, V] (and taps) of one forward over k tokens, and of k one-token forwards, after CONTEXT."""
    state = target.new_state()
    target.prefill(state, ids[:, :CONTEXT])
    full = target.forward(state, ids[:, CONTEXT : CONTEXT + k], want_taps=True)
    target.crop(state, CONTEXT)
    ones = [target.forward(state, ids[:, CONTEXT + i : CONTEXT + i + 1], want_taps=True) for i in range(k)]
    return (torch.cat([full.logits, full.taps], -1),
            torch.cat([torch.cat([o.logits for o in ones], 1), torch.cat([o.taps for o in ones], 1)], -1))


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 256, (1, CONTEXT + MAX_K), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_token_forward_is_bit_identical_to_one_token_forwards(tiny_tokenizer, ids, dtype):
    if dtype == torch.bfloat16 and not onednn_bf16_supported():  # an AVX2-only CPU: refused in one line instead
        with pytest.raises(DiffdraftError, match="AVX-512"):
            LeanLlamaTarget(make_llama().to(dtype), tiny_tokenizer, tap_layers=(0, 2, 4))
        return
    target = LeanLlamaTarget(make_llama().to(dtype), tiny_tokenizer, tap_layers=(0, 2, 4))
    assert target.row_invariant and target.dtype == dtype
    for k in range(1, MAX_K + 1):
        batched, single = k_token_vs_one_token(target, ids, k)
        assert torch.equal(batched, single), f"k = {k}: max difference {(batched - single).abs().max()}"


def test_the_identity_fails_when_the_linears_go_through_f_linear(tiny_model, tiny_tokenizer, ids):
    """Negative control: the same runtime on plain `F.linear` (MKL) is not row-invariant."""
    target = LeanLlamaTarget(tiny_model, tiny_tokenizer, tap_layers=(0, 2, 4), prefer_onednn=False)
    assert not target.row_invariant
    differs = [k for k in range(2, MAX_K + 1) if not torch.equal(*k_token_vs_one_token(target, ids, k))]
    assert differs, "F.linear happened to be row-invariant: the bit-identity test proves nothing here"


def test_lean_logits_and_taps_match_the_hf_path(tiny_model, tiny_tokenizer, ids):
    """Stated tolerance: 1e-4 absolute on logits and taps in float32 (seen: ~2e-7 on this model)."""
    taps = (0, 1, 4)  # the embedding, a middle layer and the last (HF's last hidden state is normed)
    lean, hf = LeanLlamaTarget(tiny_model, tiny_tokenizer, taps), HFTarget(tiny_model, tiny_tokenizer, taps)
    on_lean, on_hf = lean.new_state(), hf.new_state()
    for target, state in ((lean, on_lean), (hf, on_hf)):
        target.prefill(state, ids[:, :CONTEXT], want_taps=True)  # prefilled twice: the second restarts it
    a, b = lean.prefill(on_lean, ids[:, :CONTEXT], want_taps=True), hf.prefill(on_hf, ids[:, :CONTEXT], want_taps=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.taps, b.taps, rtol=0, atol=1e-4)
    a, b = lean.forward(on_lean, ids[:, CONTEXT:], want_taps=True), hf.forward(on_hf, ids[:, CONTEXT:], want_taps=True)
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(a.taps, b.taps, rtol=0, atol=1e-4)
    assert a.logits.shape == (1, MAX_K, lean.vocab_size) and a.taps.shape == (1, MAX_K, 3 * lean.hidden_size)


def test_a_long_prefill_takes_the_batched_path_and_still_agrees(tiny_model, tiny_tokenizer):
    prompt = torch.randint(0, 256, (1, 100), generator=torch.Generator().manual_seed(1))
    lean = LeanLlamaTarget(tiny_model, tiny_tokenizer, invariant_rows=8)
    hf = HFTarget(tiny_model, tiny_tokenizer)
    on_lean, on_hf = lean.new_state(), hf.new_state()
    torch.testing.assert_close(lean.prefill(on_lean, prompt).logits, hf.prefill(on_hf, prompt).logits,
                               rtol=0, atol=1e-4)
    torch.testing.assert_close(lean.forward(on_lean, prompt[:, :3]).logits, hf.forward(on_hf, prompt[:, :3]).logits,
                               rtol=0, atol=1e-4)


def tiny_mistral() -> MistralForCausalLM:
    config = MistralConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    torch.manual_seed(0)
    return MistralForCausalLM(config).eval()


def test_auto_takes_lean_for_a_llama_and_hf_otherwise(tiny_model, tiny_tokenizer):
    assert isinstance(build_target(tiny_model, tiny_tokenizer), LeanLlamaTarget)
    assert isinstance(build_target(tiny_model, tiny_tokenizer, backend="hf"), HFTarget)
    other = tiny_mistral()
    fallback = build_target(other, tiny_tokenizer)
    assert isinstance(fallback, HFTarget)  # and it says so, with why, wherever the runtime is named
    assert fallback.runtime == "hf, float32 weights (not the lean runtime: architecture 'mistral' is not in the " \
                               "Llama family)"
    assert build_target(other, tiny_tokenizer, backend="hf").runtime == "hf, float32 weights"
    with pytest.raises(DiffdraftError, match="lean runtime cannot run this model: architecture 'mistral'"):
        build_target(other, tiny_tokenizer, backend="lean")
    with pytest.raises(DiffdraftError, match="backend must be one of"):
        build_target(tiny_model, tiny_tokenizer, backend="fast")


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_a_prompt_that_fills_the_cache(tiny_tokenizer, backend):
    model = make_llama(max_positions=32)
    target = build_target(model, tiny_tokenizer, backend=backend)
    full = torch.arange(32)[None] % 200
    state = target.new_state()
    assert target.prefill(state, full).logits.shape == (1, 1, target.vocab_size)
    assert state.length == 32
    with pytest.raises(DiffdraftError, match="exceed the model context of 32"):
        target.forward(state, full[:, :1])
    target.crop(state, 30)
    assert target.forward(state, full[:, 30:]).logits.shape == (1, 2, target.vocab_size)
    with pytest.raises(DiffdraftError, match="exceed"):
        target.prefill(state, torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("backend", ["lean", "hf"])
def test_generation_stops_when_the_context_is_full(tiny_tokenizer, backend):
    target = build_target(make_llama(max_positions=32, eos_token_id=None), tiny_tokenizer, backend=backend)
    plain = SpeculativeEngine(target, None).generate(list(range(40, 60)), max_new_tokens=50)
    spec = SpeculativeEngine(target, NgramDrafter(), DraftConfig(8)).generate(list(range(40, 60)), max_new_tokens=50)
    assert plain.stop_reason == spec.stop_reason == "context"
    assert spec.tokens == plain.tokens and len(plain.tokens) == 32 - 20  # the cache held prompt + all but the last
    last = SpeculativeEngine(target, NgramDrafter(), DraftConfig(8)).generate(list(range(31)), max_new_tokens=5)
    assert last.stop_reason == "context" and len(last.tokens) == 1  # the prompt leaves room for one token


def test_crop_is_a_change_of_length_and_refuses_growth(tiny_model, tiny_tokenizer, ids):
    target = LeanLlamaTarget(tiny_model, tiny_tokenizer)
    state = target.new_state()
    target.prefill(state, ids[:, :10])
    before = target.forward(state, ids[:, 10:12]).logits
    target.crop(state, 10)
    assert state.length == 10
    assert torch.equal(target.forward(state, ids[:, 10:12]).logits, before)  # the rewritten slots read alike
    with pytest.raises(ValueError):
        target.crop(state, 13)
    target.crop(state, 0)
    with pytest.raises(RuntimeError, match="prefill"):
        target.forward(target.new_state(), ids[:, :1])
    with pytest.raises(ValueError, match="another target"):
        LeanLlamaTarget(tiny_model, tiny_tokenizer).forward(state, ids[:, :1])


def test_cache_size_caps_the_context(tiny_model, tiny_tokenizer):
    target = LeanLlamaTarget(tiny_model, tiny_tokenizer, cache_tokens=24)
    assert target.max_context == 24
    with pytest.raises(DiffdraftError, match="at least 2"):
        LeanLlamaTarget(tiny_model, tiny_tokenizer, cache_tokens=1)


def bos_tokenizer() -> PreTrainedTokenizerFast:
    """A base model's tokenizer: adds <s> in front of every text, and has no chat template."""
    vocab = {"<s>": 0, "</s>": 1, **{c: i + 2 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz \n")}}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    from tokenizers import processors

    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>")


def test_a_base_model_prompt_keeps_its_bos(tiny_model):
    tokenizer = bos_tokenizer()
    target = build_target(tiny_model, tokenizer)
    ids = target.encode_chat([{"role": "user", "content": "hi there"}])
    assert ids == tokenizer("hi there\n")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id == 0


def test_the_default_drafter_is_the_shipped_one_only_where_it_fits(tiny_model_dir):
    import diffdraft
    from diffdraft.drafters import NgramDrafter, required_tap_layers

    pipe = diffdraft.load(tiny_model_dir, threads=1)  # a 4-layer model the shipped drafter was not made for
    assert isinstance(pipe.drafter, NgramDrafter) and pipe.drafter_name == "auto: ngram"
    assert isinstance(pipe.target, LeanLlamaTarget)
    assert required_tap_layers(["auto"], num_layers=4) is None
    assert required_tap_layers(["auto"], num_layers=30) == (1, 15, 27)  # SmolLM2: the shipped drafter's taps
