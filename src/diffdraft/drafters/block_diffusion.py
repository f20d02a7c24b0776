"""The conditioned block-diffusion drafter at decode time.

Wraps BlockDiffusionNet with the target's frozen embedding and LM head. Each sequence's state
is a context cache: per drafter layer, the keys/values of every token the target has committed
(computed from the target's tapped hidden states as they arrive through begin/observe).
A step drafts n <= g-1 tokens in one parallel pass over [last token, MASK x n]: only as many
masks as tokens asked for (training's blocks hold g-1; docs/native-weights.md, "The fused drafter",
has what the shorter block costs in acceptance). Over a target whose layers run fused, the
drafter's layers do too, on 4-bit copies of its weights (drafters/fused_block.py). Each token
is drawn independently from its own marginal, so that marginal is its exact q given the
earlier draft tokens, and rejection sampling applies at temperature > 0.
An optional reduced draft vocabulary (the most frequent tokens of the training data) cuts
the LM head's cost: the drafter then only ever proposes those tokens, and its q, put back
into the full vocabulary with zeros elsewhere, is still exact.
Checkpoints: a drafter folder (drafters/checkpoint.py) whose config names the target's
width, vocabulary, layer count, tap layers and tokenizer; a mismatch is refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from diffdraft.backends.kernels import prepared_copy
from diffdraft.config import SamplingConfig
from diffdraft.drafters.base import Draft
from diffdraft.drafters.checkpoint import read_checkpoint, write_checkpoint
from diffdraft.drafters.draft_head import DRAFT_VOCAB_KEY, DraftHead, HeadedDrafter, add_draft_vocab
from diffdraft.drafters.fused_block import fused_block_layers
from diffdraft.errors import DiffdraftError
from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet
from diffdraft.sampling import logits_to_probs, sample

KIND = "block-diffusion"
ALTERNATIVES = 4  # best tokens per slot offered to draft trees


def target_signature(target) -> dict:
    """What a drafter must agree with to draft for `target`."""
    return {
        "hidden_size": target.hidden_size,
        "vocab_size": target.vocab_size,
        "num_layers": target.num_layers,
        "tokenizer": target.tokenizer_fingerprint(),
    }


def recorded_signature(target) -> dict:
    """The signature a trained drafter records: target_signature plus the target's name, for messages."""
    return {**target_signature(target), "name": target.name}


def trained_for(signature: dict) -> str:
    """The target a drafter was trained for, in words."""
    shape = (f"{signature.get('num_layers')} layers, width {signature.get('hidden_size')}, "
             f"vocabulary {signature.get('vocab_size')}")
    return f"{signature['name']} ({shape})" if signature.get("name") else f"a target of {shape}"


SIGNATURE_CHECKS = (("hidden_size", "width"), ("vocab_size", "vocabulary size"), ("num_layers", "layer count"))


def check_signature(signature: dict, target, checks=SIGNATURE_CHECKS) -> None:
    """Refuse a drafter whose recorded target differs from `target` in a checked field or the tokenizer."""
    theirs = target_signature(target)
    for key, what in checks:
        if signature.get(key) != theirs[key]:
            raise DiffdraftError(
                f"drafter does not fit the target {target.name}: it was trained for {trained_for(signature)}; "
                f"drafter {what} {signature.get(key)}, target {what} {theirs[key]}"
            )
    if "tokenizer" in signature and signature["tokenizer"] != theirs["tokenizer"]:  # a foreign DFlash folder has none
        raise DiffdraftError(f"drafter does not fit the target {target.name}: it was trained for "
                             f"{trained_for(signature)}, with a different tokenizer")


@dataclass
class ContextCache:
    """One sequence's context for the drafter: keys and values [L, 2, Hkv, C, hd] (index 0 the keys) of the
    first `length` committed tokens. Slots past them are scratch (a fused drafter call writes its block's
    keys and values there)."""

    kv: torch.Tensor
    length: int = -1  # -1: begin() not called yet

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `index`'s committed keys and values, [1, Hkv, length, hd] each (views)."""
        return self.kv[index, 0, None, :, : self.length], self.kv[index, 1, None, :, : self.length]


class BlockDiffusionDrafter(HeadedDrafter):
    name = KIND
    wants_taps = True
    states_q = True  # each Draft carries the head's law q

    def __init__(
        self,
        target,
        net: BlockDiffusionNet,
        tap_layers: tuple[int, ...],
        signature: dict | None = None,
        draft_vocab: torch.Tensor | None = None,  # [N] target token ids the drafter may propose
        q_scale: float = 1.0,  # logits are divided by it: the calibration of q for sampling (train/calibrate.py)
    ):
        if not (isinstance(q_scale, (int, float)) and 0 < q_scale < float("inf")):
            raise DiffdraftError(f"the drafter's q scale must be a positive number, got {q_scale!r}")
        self.q_scale = float(q_scale)
        self.target = target
        self.net = net
        self.tap_layers = tuple(tap_layers)
        self.signature = signature or target_signature(target)
        self.check_compatible(target)
        # its layers in one C++ call where its target's run so (None: the Python layers of _fast), and why not
        self._fused, self.fused_note = fused_block_layers(net, target)
        # Decoding runs a copy whose linears are prepared once for the fastest kernel (the net passed
        # in may still be training); `net` stays the plain network, for saving and inspection. Its linears
        # follow the target's: 4-bit beside fused 4-bit layers (a drafter call reads a third of the bytes),
        # float16 over a float16 head. Either way q stays the law of what it drafts.
        self._fast = prepared_copy(net, target.device, target.dtype, half=target.half_head,
                                   four_bit=self.fused_layers)
        # The columns of the target's taps that hold our layers, in our order (the target may tap more).
        index = target.tap_index(self.tap_layers)
        width = target.hidden_size
        self._tap_columns = None if index == list(range(len(target.tap_layers))) else torch.tensor(
            [i * width + j for i in index for j in range(width)], device=target.device)
        self.head = DraftHead(target, draft_vocab, four_bit=self.fused_layers)
        self._key_order = None if self._fused is None else self._fused.key_order().to(target.device)

    @property
    def fused_layers(self) -> bool:
        """Whether its layers run as one C++ call on 4-bit weights (drafters/fused_block.py)."""
        return self._fused is not None

    def check_compatible(self, target) -> None:
        check_signature(self.signature, target)
        if self.net.cfg.hidden_size != target.hidden_size or self.net.cfg.num_taps != len(self.tap_layers):
            raise DiffdraftError("drafter config is inconsistent: width or tap count does not match its own network")
        bad = [i for i in self.tap_layers if not 0 <= i <= target.num_layers]
        if bad:
            raise DiffdraftError(f"drafter taps layers {bad}, outside the target's 0..{target.num_layers}")
        mask_id = self.net.cfg.mask_token_id
        if mask_id is not None and not 0 <= mask_id < target.vocab_size:
            raise DiffdraftError(f"drafter mask token {mask_id} is outside the target's vocabulary of {target.vocab_size}")

    def cost_id(self) -> str:
        vocab = 0 if self.draft_vocab is None else self.draft_vocab.numel()  # (q_scale costs nothing)
        layers = "fused-4-bit" if self.fused_layers else "python"
        return f"{KIND}:{self.net.cfg.to_dict()}:vocab={vocab}:layers={layers}:block=drafted+1"

    # ----- context cache -----
    def new_state(self) -> ContextCache:
        """A context cache for one sequence, room for the target's context and one block past it, written in
        place as tokens are committed (untouched pages cost nothing until written)."""
        cfg = self.net.cfg
        shape = (cfg.num_layers, 2, cfg.num_kv_heads, self.target.max_context + cfg.block_size, cfg.head_dim)
        return ContextCache(kv=torch.empty(shape, device=self.target.device, dtype=self.target.dtype))

    def begin(self, state: ContextCache, prompt: list[int], taps: torch.Tensor | None) -> None:
        state.length = 0
        self.observe(state, taps)

    @torch.inference_mode()
    def observe(self, state: ContextCache, taps: torch.Tensor | None) -> None:
        """taps: [1, n, n_taps*D] of newly committed tokens."""
        if state.length < 0:
            raise RuntimeError("call begin() before observe()")
        if taps is None or taps.shape[1] == 0:
            return
        if self._tap_columns is not None:
            taps = taps.index_select(-1, self._tap_columns)  # [1, n, n_our_taps*D]
        n, start = taps.shape[1], state.length
        positions = torch.arange(start, start + n, device=taps.device)[None]  # [1, n]
        new_kv = self._fast.context_kv(self._fast.fuse_context(taps.to(self.target.dtype)), positions)
        for index, (k, v) in enumerate(new_kv):  # [1, Hkv, n, hd] each
            if self._key_order is not None:
                k = k[..., self._key_order]  # the fused layers keep each rotary pair side by side
            state.kv[index, 0, :, start : start + n] = k[0]
            state.kv[index, 1, :, start : start + n] = v[0]
        state.length += n

    # ----- drafting -----
    @torch.inference_mode()
    def slot_logits(self, state: ContextCache, tokens: list[int], count: int) -> torch.Tensor:
        """The head's logits for the next `count` slots after `tokens` (the context cache holds all but the
        last), before q_scale: [count, N] float32."""
        if state.length != len(tokens) - 1:
            raise RuntimeError(
                f"drafter context holds {state.length} tokens, expected {len(tokens) - 1}: begin/observe were skipped"
            )
        rows = count + 1  # the known token and a mask per slot asked for: masks past them would go unread
        device = self.target.device
        known = self.target.embed_tokens(torch.tensor([[tokens[-1]]], device=device))  # [1, 1, D]
        mask = self._fast.mask_vector(self.target.embed_tokens)
        block = self._fast.block_inputs(known, mask, size=rows)  # [1, rows, D]
        if self._fused is not None:
            hidden = self._fast.norm(self._fused.run(block[0], state.kv, state.length)[1:])  # [count, D]
        else:
            positions = torch.arange(state.length, state.length + rows, device=device)[None]  # [1, rows]
            context = [state.layer(i) for i in range(self.net.cfg.num_layers)]
            hidden = self._fast(block, positions, context, mask=None)[0, 1:]  # [count, D]
        return self.head.logits(hidden).float()  # [count, N]

    @torch.inference_mode()
    def propose(
        self, state: ContextCache, tokens: list[int], num_tokens: int, sampling: SamplingConfig,
        generator: torch.Generator | None,
    ) -> Draft:
        count = min(num_tokens, self.block_size - 1)
        if count <= 0:
            return Draft.empty()
        logits = self.slot_logits(state, tokens, count)  # [count, N]
        if self.q_scale != 1.0:
            logits = logits / self.q_scale
        law = logits_to_probs(logits, sampling)  # [count, N]: each token's exact q
        picked = law.argmax(dim=-1) if sampling.greedy else sample(law, generator)  # [count]
        # [count] how sure the drafter is per slot: its unsharpened top probability (at T=1 with no
        # top-k / top-p filter that is the law itself, so no second softmax)
        plain = law if sampling.temperature == 1.0 and sampling.top_k == 0 and sampling.top_p == 1.0 \
            else logits.softmax(dim=-1)
        best, choices = plain.topk(min(ALTERNATIVES, plain.shape[-1]), dim=-1)  # [count, K]
        return Draft(tokens=self.head.to_target_ids(picked).cpu(), probs=self.head.to_full(law).cpu(),
                     confidence=best[:, 0].cpu(),
                     alternatives=(self.head.to_target_ids(choices).cpu(), best.float().cpu()))

    # ----- checkpoints -----
    @classmethod
    def load(cls, folder: str | Path, target) -> "BlockDiffusionDrafter":
        net, tap_layers, signature, config, draft_vocab = load_net(folder)
        return cls(target, net, tap_layers, signature, draft_vocab=draft_vocab, q_scale=config.get("q_scale", 1.0))

    @classmethod
    def load_dflash(cls, folder: str | Path, target) -> "BlockDiffusionDrafter":
        """A drafter from a DFlash folder (exported here, or trained by SpecForge or z-lab)."""
        from diffdraft.drafters.dflash import load_dflash

        net, tap_layers, signature, q_scale = load_dflash(folder)
        return cls(target, net, tap_layers, signature, q_scale=q_scale)


def save_drafter(
    folder, net: BlockDiffusionNet, tap_layers, signature: dict, extra: dict | None = None,
    dtype: torch.dtype = torch.float32, draft_vocab: torch.Tensor | None = None,
) -> None:
    """Write a drafter folder; `extra` (training facts) goes into the config under "training"."""
    config = {"kind": KIND, "net": net.cfg.to_dict(), "tap_layers": list(tap_layers), "target": signature}
    if extra:
        config["training"] = extra
    tensors = dict(net.state_dict())
    add_draft_vocab(config, tensors, draft_vocab)
    write_checkpoint(folder, config, tensors, dtype=dtype)


def frequent_tokens(sequences, size: int, vocab_size: int) -> torch.Tensor:
    """The `size` most frequent response tokens of training sequences: ids [size], most frequent first."""
    ids = torch.tensor([t for seq in sequences for t in seq.tokens[seq.prompt_len :]], dtype=torch.long)
    counts = torch.bincount(ids, minlength=vocab_size)  # [V]
    size = min(size, int((counts > 0).sum()))
    return counts.argsort(descending=True, stable=True)[:size]


def load_net(folder) -> tuple[BlockDiffusionNet, tuple[int, ...], dict, dict, torch.Tensor | None]:
    """Read a block-diffusion drafter folder: (net, tap layers, target signature, config, draft vocab)."""
    config, tensors = read_checkpoint(folder)
    draft_vocab = tensors.pop(DRAFT_VOCAB_KEY, None)
    if config.get("kind") != KIND:
        raise DiffdraftError(f"{folder} holds a {config.get('kind')!r} drafter, not a {KIND} one")
    try:
        cfg = BlockDiffusionConfig.from_dict(config["net"])
        tap_layers = tuple(int(i) for i in config["tap_layers"])
        signature = dict(config["target"])
        net = BlockDiffusionNet(cfg)
        net.load_state_dict(tensors)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise DiffdraftError(f"drafter in {folder} is damaged or inconsistent: {type(err).__name__}: {err}") from err
    return net, tap_layers, signature, config, draft_vocab
