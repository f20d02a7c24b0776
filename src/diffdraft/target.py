"""The target: a Hugging Face causal LM behind a small incremental-decoding interface.

prefill(ids) starts a sequence, forward(ids) appends k tokens and returns their logits
(and, on request, hidden states tapped from chosen layers), crop(n) rolls the KV cache back
to the first n tokens. It also hands out the embedding and LM head for drafters to share,
and the tokenizer with its chat template. It knows nothing of drafting or verification.
Batch size is 1 for now; tensors keep their batch dimension.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import nn
from transformers import DynamicCache

from diffdraft.errors import DiffdraftError


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [B, k, V]
    taps: torch.Tensor | None  # [B, k, n_taps * D], when asked for


def default_tap_layers(num_layers: int) -> tuple[int, ...]:
    """Layers spread over the depth: 1, L/2 and L-3 (hidden state after that many layers)."""
    return tuple(sorted({1, num_layers // 2, max(1, num_layers - 3)}))


class Target:
    """Incremental decoding over one HF causal LM with a crop-able KV cache."""

    def __init__(self, model: nn.Module, tokenizer, tap_layers: tuple[int, ...] | None = None, name: str = "model"):
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        config = model.config
        self.num_layers: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = model.get_output_embeddings().weight.shape[0]
        self.max_context: int = getattr(config, "max_position_embeddings", None) or 2048
        self.tap_layers = tuple(tap_layers) if tap_layers is not None else default_tap_layers(self.num_layers)
        bad = [i for i in self.tap_layers if not 0 <= i <= self.num_layers]
        if bad:
            raise DiffdraftError(f"tap layers {bad} are outside 0..{self.num_layers} for this target")
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self._cache: DynamicCache | None = None
        self._length = 0

    # ----- shared parts for drafters -----
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.model.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Linear:
        return self.model.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    # ----- incremental decoding -----
    @property
    def length(self) -> int:
        """Tokens held in the KV cache."""
        return self._length

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, want_taps: bool = False) -> TargetOutput:
        """Start a new sequence. ids: [B, T] int64."""
        self._cache = DynamicCache(config=self.model.config)
        self._length = 0
        return self.forward(ids, want_taps=want_taps)

    @torch.inference_mode()
    def forward(self, ids: torch.Tensor, want_taps: bool = False) -> TargetOutput:
        """Append k tokens. ids: [B, k] int64 -> logits [B, k, V] (+ taps [B, k, n_taps*D])."""
        if self._cache is None:
            raise RuntimeError("call prefill() before forward()")
        if self._length + ids.shape[1] > self.max_context:
            raise DiffdraftError(f"sequence would exceed the model context of {self.max_context} tokens")
        out = self.model(
            input_ids=ids.to(self.device),
            past_key_values=self._cache,
            use_cache=True,
            output_hidden_states=want_taps,
        )
        self._length += ids.shape[1]
        taps = torch.cat([out.hidden_states[i] for i in self.tap_layers], dim=-1) if want_taps else None
        return TargetOutput(logits=out.logits, taps=taps)

    def crop(self, n: int) -> None:
        """Keep only the first n tokens in the KV cache."""
        if not 0 <= n <= self._length:
            raise ValueError(f"cannot crop a cache of {self._length} tokens to {n}")
        if n < self._length:
            self._cache.crop(n - self._length)  # negative: drop that many from the end
            self._length = n

    # ----- text -----
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation through the chat template, ready for the assistant's turn."""
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            text = "\n".join(m["content"] for m in messages) + "\n"
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def tokenizer_fingerprint(self) -> str:
        """A short hash of the vocabulary, so a drafter can tell it was trained on this tokenizer."""
        return tokenizer_fingerprint(self.tokenizer)


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = tokenizer.get_vocab()
    text = "\n".join(f"{i}:{t}" for t, i in sorted(vocab.items(), key=lambda item: item[1]))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif eos:
            ids.update(eos)
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return frozenset(ids)
