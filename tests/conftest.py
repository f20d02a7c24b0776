"""Shared fixtures: tiny random Llama targets and a byte-level tokenizer, built in code.

Nothing here downloads anything. The tiny models are seeded, so every test sees the same
weights. Torch runs on one thread: the machine's cores are shared with other jobs, and
OpenMP spinning over busy cores makes a 4 ms forward take most of a second.
"""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(1)

from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast  # noqa: E402

from diffdraft.backends import build_target  # noqa: E402
from diffdraft.target import TargetBackend  # noqa: E402

# The fixed-length drafting the engine tests were written for: every drafted token is verified and
# each slot is drawn from q (DraftConfig's defaults choose the length by cost and propose argmaxes).
FIXED = {"length": "fixed", "proposals": "sample"}
TINY_VOCAB = 300
EOS_TEXT = "<eos>"
EOS_ID = 256  # the byte tokens take ids 0..255


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the printable character that stands for it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1))
    bs += list(range(ord("\u00ae"), ord("\u00ff") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def make_tokenizer(vocab_size: int = TINY_VOCAB) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer: one token per UTF-8 byte (ids 0..255), <eos> = 256, fillers above."""
    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab[EOS_TEXT] = EOS_ID
    for i in range(EOS_ID + 1, vocab_size):
        vocab[f"<extra_{i}>"] = i
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=EOS_TEXT)


def make_llama(
    vocab_size: int = TINY_VOCAB,
    layers: int = 4,
    hidden: int = 64,
    heads: int = 4,
    kv_heads: int = 2,
    max_positions: int = 256,
    seed: int = 0,
    eos_token_id: int | None = EOS_ID,
    init_range: float = 0.02,
) -> LlamaForCausalLM:
    """A seeded random Llama in float32, eval mode, gradients off."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        initializer_range=init_range,
        bos_token_id=None,
        pad_token_id=None,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    model.requires_grad_(False)
    model.generation_config.eos_token_id = eos_token_id
    return model


@pytest.fixture(scope="session")
def tiny_tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    return make_llama()


@pytest.fixture
def tiny_target(tiny_model, tiny_tokenizer) -> TargetBackend:
    """A fresh Target over the shared tiny model (Target holds the cache; the model is read-only)."""
    return build_target(tiny_model, tiny_tokenizer, name="tiny")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model, tiny_tokenizer) -> str:
    """The tiny model and tokenizer saved as a Hugging Face folder, for --model."""
    folder = tmp_path_factory.mktemp("tiny-llama")
    tiny_model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Every test starts at one torch thread, whatever the one before it set (the CLI and load() set
    the process's thread count, and a few results depend on it)."""
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(1)


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    """Point DIFFDRAFT_CACHE at an empty folder for this test."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFDRAFT_CACHE", str(cache))
    return cache


def pytest_report_header(config):
    return f"torch threads: {torch.get_num_threads()}, DIFFDRAFT_CACHE={os.environ.get('DIFFDRAFT_CACHE', '(default)')}"
