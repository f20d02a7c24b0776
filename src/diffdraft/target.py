"""The target backend interface: what the engine, the drafters, the trainer and the bench ask of a target.

A backend holds the loaded weights, shared by every request; what one sequence needs (its KV
cache, how many tokens it holds) lives in a TargetState from new_state(), which the caller
keeps and hands back: prefill(state, ids) starts the sequence, forward(state, ids) appends k
tokens and returns their logits (and, on request, the hidden states tapped from the layers
fixed when the backend was built), crop(state, n) rolls its KV cache back to the first n
tokens. Any number of states may be alive at once on one backend. It hands out the embedding
and LM head for drafters to share, the EOS ids, the context length, and the tokenizer with
the model's own rules for turning text into ids.
`module` is the Hugging Face causal LM the backend was built from, for the components that
build on the module itself (the dLLM conversion, the early-exit drafter, training batches,
the HF peers in the bench); decoding goes through the backend, never through the module.

Implementations live in diffdraft.backends: `hf` (any HF causal LM) and `lean` (the Llama
family, static cache, row-invariant kernels). Nothing here knows of drafting or verification.
Each state holds one sequence; tensors keep their batch dimension of 1. Several sequences go
through one call with forward_many (a batch of requests): on a backend that `takes_batches`
their rows share one forward, elsewhere they run one after another, and either way each
sequence gets the logits its own forward() would give.
"""

from __future__ import annotations

import functools
import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch import nn

from diffdraft.errors import DiffdraftError


@dataclass
class TargetOutput:
    logits: torch.Tensor  # [B, k, V]; after prefill only the last position's, [B, 1, V]
    taps: torch.Tensor | None  # [B, k, n_taps * D], when asked for


@dataclass(frozen=True)
class Rows:
    """Where the k rows of one forward sit and what each sees (docs/design.md, 'The row forward'):
    row i is at position length + depth[i] and attends to the committed cache plus the rows j of
    the same call with sees[i][j] (itself included). A chain is depth i, sees j <= i; a draft tree
    sees its ancestors. The rows' keys and values go to cache slots length..length+k-1 in row order
    until commit_path keeps one path of them."""

    depth: tuple[int, ...]
    sees: tuple[tuple[int, ...], ...]  # per row, the rows it sees, ascending, itself last

    @staticmethod
    def tree(parents: list[int]) -> "Rows":
        """Rows from parents: -1 for a row that follows the committed sequence, else an earlier row."""
        depth, sees = [], []
        for i, parent in enumerate(parents):
            if parent == -1:
                depth.append(0)
                sees.append((i,))
            elif isinstance(parent, int) and 0 <= parent < i:
                depth.append(depth[parent] + 1)
                sees.append(sees[parent] + (i,))
            else:
                raise ValueError(f"row {i}'s parent must be -1 or an earlier row, got {parent!r}")
        return Rows(tuple(depth), tuple(sees))

    @property
    def is_chain(self) -> bool:
        return all(seen == tuple(range(i + 1)) for i, seen in enumerate(self.sees))


@dataclass
class SequenceRows:
    """One sequence's part of a forward over several (TargetBackend.forward_many): its state, the new
    token ids [k] and where they sit (None: a chain after the committed cache)."""

    state: "TargetState"
    ids: torch.Tensor  # [k] int64
    rows: Rows | None = None


def default_tap_layers(num_layers: int) -> tuple[int, ...]:
    """Layers spread over the depth: 1, L/2 and L-3 (hidden state after that many layers)."""
    return tuple(sorted({1, num_layers // 2, max(1, num_layers - 3)}))


class TargetState:
    """One sequence's decoding state on one backend: its KV cache (the backend's own kind), the number of
    tokens the cache holds, and the most it may hold (its capacity, at most the model's context; a static
    cache reserves that many slots). Made by TargetBackend.new_state(); never shared by requests."""

    def __init__(self, owner: "TargetBackend", capacity: int):
        self.owner = owner
        self.capacity = capacity
        self.cache = None  # made by the first prefill
        self.length = 0  # tokens held in the cache


class TargetBackend(ABC):
    """Incremental decoding over one causal LM with a crop-able KV cache per sequence (see the module
    docstring). Holds no per-request state."""

    kind: str = "backend"  # "hf" or "lean"
    takes_trees: bool = False  # whether forward() takes rows other than a chain (Rows), and commit_path other paths
    takes_batches: bool = False  # whether forward_many() runs several sequences' rows in one forward
    weights: str = "float32"  # what its linears run on: the loaded weights, or 4-bit (lean: native, int4)
    note: str | None = None  # why this backend, where it was not the one asked for (auto's fallback)
    half_head: bool = False  # whether its LM head reads float16 weights (HalfLinear); its drafters' linears follow
    fused_layers: bool = False  # whether its decoder layers run as one C++ call (backends/fused.py)
    fused_build: str = ""  # and which build of it (a key of its source, torch and CPU): costs follow its code

    def __init__(self, module: nn.Module, tokenizer, tap_layers: tuple[int, ...] | None = None, name: str = "model"):
        self.module = module
        self.tokenizer = tokenizer
        self.name = name
        config = module.config
        self.num_layers: int = config.num_hidden_layers
        self.hidden_size: int = config.hidden_size
        self.vocab_size: int = module.get_output_embeddings().weight.shape[0]
        self.max_context: int = getattr(config, "max_position_embeddings", None) or 2048
        self.tap_layers: tuple[int, ...] = tuple(tap_layers) if tap_layers is not None \
            else default_tap_layers(self.num_layers)
        bad = [i for i in self.tap_layers if not 0 <= i <= self.num_layers]
        if bad:
            raise DiffdraftError(f"tap layers {bad} are outside 0..{self.num_layers} for this target")
        self.eos_token_ids = _eos_ids(module, tokenizer)

    @property
    def runtime(self) -> str:
        """The backend and its weights in a few words, for stats lines and banners: "lean, native weights"."""
        weights = self.weights if self.weights != "float32" else str(self.dtype).removeprefix("torch.")
        return f"{self.kind}, {weights} weights" + (f" ({self.note})" if self.note else "")

    # ----- shared parts for drafters -----
    @property
    def embed_tokens(self) -> nn.Embedding:
        return self.module.get_input_embeddings()

    @property
    def lm_head(self) -> nn.Linear:
        return self.module.get_output_embeddings()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    def tap_index(self, layers: tuple[int, ...]) -> list[int]:
        """Where each of `layers` sits among this backend's taps; refuses layers it does not tap."""
        missing = [i for i in layers if i not in self.tap_layers]
        if missing:
            raise DiffdraftError(
                f"the target taps layers {list(self.tap_layers)}, not {missing}: build it with the drafter's tap layers"
            )
        return [self.tap_layers.index(i) for i in layers]

    @torch.no_grad()
    def batch_taps(self, tokens: torch.Tensor, attention_mask: torch.Tensor, layers: tuple[int, ...]) -> torch.Tensor:
        """Hidden states after `layers` for a padded batch, for training: tokens [B, L] -> [B, L, n*D].
        Runs the module's own forward: no cache, no decoding state touched."""
        out = self.module(input_ids=tokens, attention_mask=attention_mask, output_hidden_states=True, logits_to_keep=1)
        return torch.cat([out.hidden_states[i] for i in layers], dim=-1)

    def kv_bytes(self, tokens: int) -> int:
        """Bytes of keys and values that `tokens` positions take in a sequence's cache."""
        config = self.module.config
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or self.hidden_size // config.num_attention_heads
        return tokens * self.num_layers * 2 * kv_heads * head_dim * self.dtype.itemsize

    # ----- incremental decoding -----
    def new_state(self, capacity: int | None = None) -> TargetState:
        """An empty sequence on this target, holding up to `capacity` tokens (default: the model's context);
        prefill() starts it."""
        if capacity is None:
            capacity = self.max_context
        if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= self.max_context:
            raise ValueError(f"a sequence holds 1 to {self.max_context} tokens, got {capacity!r}")
        return TargetState(self, capacity)

    def prefill(self, state: TargetState, ids: torch.Tensor, want_taps: bool = False) -> TargetOutput:
        """Start (or restart) the sequence. ids: [B, T] int64 -> the last position's logits [B, 1, V]
        (+ taps [B, T, ...])."""
        self._check_owner(state)
        state.cache = self._empty_cache(state.cache, state.capacity)
        state.length = 0
        return self._run(state, ids, want_taps, last_only=True)

    def forward(self, state: TargetState, ids: torch.Tensor, want_taps: bool = False,
                rows: Rows | None = None) -> TargetOutput:
        """Append k tokens. ids: [B, k] int64 -> logits [B, k, V] (+ taps [B, k, n_taps*D]). rows: where
        they sit and what each sees (a draft tree); None is a chain."""
        self._check_rows(state, ids.shape[1], rows)
        if rows is None or rows.is_chain:
            return self._run(state, ids, want_taps, last_only=False)
        return self._run_rows(state, ids, want_taps, rows)

    def _check_rows(self, state: TargetState, k: int, rows: Rows | None) -> None:
        """What forward() and forward_many() ask of one sequence's k new rows before running them."""
        self._check_owner(state)
        if state.cache is None:
            raise RuntimeError("call prefill() before forward()")
        if rows is not None and len(rows.depth) != k:
            raise ValueError(f"rows describe {len(rows.depth)} rows for {k} tokens")
        if rows is not None and not self.takes_trees and not rows.is_chain:
            raise DiffdraftError(f"the {self.kind} backend verifies chains only; draft trees need --backend lean")

    def forward_many(self, parts: list[SequenceRows], want_taps: bool = False) -> list[TargetOutput]:
        """Append new rows to several sequences at once (docs/design.md, 'The row forward'): one output per
        part, each what forward(part.state, part.ids[None], want_taps, part.rows) would return. A backend
        that takes batches runs them in one forward; others run them one after another."""
        for part in parts:
            if part.ids.dim() != 1 or part.ids.numel() == 0:
                raise ValueError(f"each sequence brings a row or more of token ids [k], got {tuple(part.ids.shape)}")
            self._check_rows(part.state, part.ids.shape[0], part.rows)
        if len({id(part.state) for part in parts}) != len(parts):
            raise ValueError("a sequence can appear only once in a forward over several")
        if len(parts) <= 1 or not self.takes_batches:
            return [self.forward(part.state, part.ids[None], want_taps, part.rows) for part in parts]
        return self._run_many(parts, want_taps)

    def _run_many(self, parts: list[SequenceRows], want_taps: bool) -> list[TargetOutput]:
        """forward_many() in one forward (backends with takes_batches)."""
        raise NotImplementedError

    def commit_path(self, state: TargetState, start: int, path: list[int]) -> None:
        """Keep one path of the rows the last forward appended at `start`: rows path[0] < path[1] < ...
        (each the child of the one before, path[0] at depth 0) become positions start..; the rest go."""
        self._check_owner(state)
        if any(b <= a for a, b in zip(path, path[1:])) or (path and not start + path[-1] < state.length):
            raise ValueError(f"a path of rows ascending within the cache, got {path} at {start}")
        if path != list(range(len(path))):
            if not self.takes_trees:
                raise DiffdraftError(f"the {self.kind} backend keeps chains only")
            self._move_rows(state, start, path)
        self.crop(state, start + len(path))

    def crop(self, state: TargetState, n: int) -> None:
        """Keep only the first n tokens in the sequence's KV cache."""
        self._check_owner(state)
        if not 0 <= n <= state.length:
            raise ValueError(f"cannot crop a cache of {state.length} tokens to {n}")
        if n < state.length:
            self._crop_cache(state, n)
            state.length = n

    @abstractmethod
    def _empty_cache(self, old, capacity: int):
        """A cache holding nothing, with room for `capacity` tokens; `old` (the state's previous cache, or None)
        may be reused."""

    @abstractmethod
    def _run(self, state: TargetState, ids: torch.Tensor, want_taps: bool, last_only: bool) -> TargetOutput:
        """Run ids [B, k] at positions state.length.., write their keys/values into state.cache and
        advance state.length; logits of the last position only when last_only."""

    def _run_rows(self, state: TargetState, ids: torch.Tensor, want_taps: bool, rows: Rows) -> TargetOutput:
        """forward() over rows that are not a chain (backends with takes_trees)."""
        raise NotImplementedError

    def _move_rows(self, state: TargetState, start: int, path: list[int]) -> None:
        """Copy cache slots start + path[j] to start + j (backends with takes_trees)."""
        raise NotImplementedError

    @abstractmethod
    def _crop_cache(self, state: TargetState, n: int) -> None:
        """Drop what the cache holds beyond the first n tokens (n < state.length; the length is set after)."""

    def _check_owner(self, state: TargetState) -> None:
        if state.owner is not self:
            raise ValueError("this decoding state belongs to another target backend")

    def _check_room(self, state: TargetState, k: int) -> None:
        if state.length + k > state.capacity:
            if state.capacity == self.max_context:
                raise DiffdraftError(f"sequence would exceed the model context of {self.max_context} tokens")
            raise DiffdraftError(f"sequence would exceed its cache of {state.capacity} tokens")

    # ----- text -----
    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of a conversation, ready for the assistant's turn, by the model's own rules.

        With a chat template the template writes every special token (BOS included where the
        model wants one), so nothing more is added. Without one each message's text ends with a
        line break, and the tokenizer adds what it always adds (a base model's BOS, say), as
        `tokenizer(text)` does for HF `generate`.
        """
        if getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return self.tokenizer(text, add_special_tokens=False)["input_ids"]
        return self.encode_text("\n".join(m["content"] for m in messages) + "\n")

    def encode_text(self, text: str) -> list[int]:
        """Token ids of raw text (no chat template), with what the tokenizer always adds (a BOS, say)."""
        return self.tokenizer(text)["input_ids"]

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_bytes(self, token: int) -> bytes:
        """The bytes one token stands for: with a byte-level tokenizer (GPT-2's pieces, SmolLM2's) exactly,
        part of a UTF-8 character included; a special token as its name; otherwise the token decoded alone."""
        piece = self.tokenizer.convert_ids_to_tokens(int(token))
        if piece is None:
            return b""
        if int(token) in self.tokenizer.all_special_ids:
            return piece.encode("utf-8")
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if type(getattr(backend, "decoder", None)).__name__ == "ByteLevel":
            table = _byte_level_bytes()
            if all(ch in table for ch in piece):
                return bytes(table[ch] for ch in piece)
        return self.decode([int(token)]).encode("utf-8")

    def tokenizer_fingerprint(self) -> str:
        """A short hash of the vocabulary, so a drafter can tell it was trained on this tokenizer. Hashed once
        (SmolLM2's 49k entries take ~70 ms, which every request paid when its engine checked its drafter)."""
        if getattr(self, "_fingerprint", None) is None:
            self._fingerprint = tokenizer_fingerprint(self.tokenizer)
        return self._fingerprint


@functools.cache
def _byte_level_bytes() -> dict[str, int]:
    """Byte-level BPE's alphabet back to bytes: printable Latin-1 bytes stand for themselves, the other
    bytes (controls, space, 127-160, 173) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    shifted = [b for b in range(256) if b not in table.values()]
    table.update({chr(256 + i): b for i, b in enumerate(shifted)})
    return table


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
