"""What each kind of drafter trains on: the network, and its logits and labels for a batch.

A task owns a drafter network and knows how to turn a batch of sequences into logits of
the masked block slots and their labels ([B, nb, g-1, V], [B, nb, g-1]):
- BlockDiffusionTask: the frozen target runs over the batch for the tapped hidden states;
  every block [anchor token, MASK x (g-1)] reads the fused taps of the positions before its
  anchor (docs/design.md, 'Drafters').
- MaskedDiffusionTask: the standalone drafter runs over the tokens themselves (causal) and
  over blocks whose slots are masked at a random ratio (the masked-diffusion objective);
  only masked slots are scored. In evaluation every slot is masked, as one-step drafting
  sees it. Its layers start as a copy of the target's first layers.
The trainer (train/trainer.py) owns data order, optimisation and checkpoints; the task
knows nothing of those.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffdraft.drafters.block_diffusion import frequent_tokens, load_net, recorded_signature, save_drafter
from diffdraft.drafters.dflash import choose_mask_token
from diffdraft.drafters.masked_diffusion import load_masked_net, save_masked_drafter
from diffdraft.errors import DiffdraftError
from diffdraft.models.block_diffusion import BlockDiffusionConfig, BlockDiffusionNet
from diffdraft.models.masked_diffusion import MaskedDiffusionConfig, MaskedDiffusionNet
from diffdraft.target import default_tap_layers
from diffdraft.train.masks import (
    IGNORE,
    block_attention_mask,
    block_labels,
    block_positions,
    prefix_and_blocks_mask,
    sample_anchors,
    sample_block_masking,
)


def layer_shape(target) -> dict:
    """Attention/MLP sizes of a drafter layer of the target's width (the target's own)."""
    hf = target.module.config  # the target's own layer sizes
    rope = getattr(hf, "rope_theta", None) or (getattr(hf, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return {
        "hidden_size": target.hidden_size,
        "num_heads": hf.num_attention_heads,
        "num_kv_heads": getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
        "head_dim": getattr(hf, "head_dim", None) or target.hidden_size // hf.num_attention_heads,
        "intermediate_size": hf.intermediate_size,
        "rope_theta": float(rope),
        "rms_eps": float(getattr(hf, "rms_norm_eps", 1e-5)),
    }


def _check_init(cfg, net_cfg, loaded_cfg, folder) -> None:
    if loaded_cfg != net_cfg:
        raise DiffdraftError(f"cannot start from {folder}: its network ({loaded_cfg}) differs from this run's "
                             f"({net_cfg}); match --layers and --block-size")


class BlockDiffusionTask:
    kind = "block-diffusion"

    def __init__(self, cfg, target, autocast):
        self.cfg, self.target, self.autocast = cfg, target, autocast
        self.tap_layers = tuple(cfg.tap_layers) if cfg.tap_layers else default_tap_layers(target.num_layers)
        net_cfg = BlockDiffusionConfig(num_taps=len(self.tap_layers), num_layers=cfg.num_layers,
                                       block_size=cfg.block_size, **layer_shape(target), **self.layout(cfg, target))
        self.net = BlockDiffusionNet(net_cfg)
        self.net.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        if cfg.init_from:
            loaded, taps, *_ = load_net(cfg.init_from)
            _check_init(cfg, net_cfg, loaded.cfg, cfg.init_from)
            if taps != self.tap_layers:
                raise DiffdraftError(f"cannot start from {cfg.init_from}: it taps layers {taps}, this run {self.tap_layers}")
            self.net.load_state_dict(loaded.state_dict())
        self.module = self.net  # what runs the forward: the net, or its DDP wrapper

    def layout(self, cfg, target) -> dict:
        """Network options of this kind (the original layout: a learned MASK vector, no q/k norms)."""
        return {}

    def logits_and_labels(self, batch: dict[str, torch.Tensor], generator: torch.Generator, training: bool,
                          teacher: bool = False):
        """-> logits [B, nb, g-1, V], labels [B, nb, g-1]; with teacher=True also the target's own logits
        for each slot's token (its next-token law at the position before), [B, nb, g-1, V], no gradient."""
        g, nb = self.cfg.block_size, self.cfg.blocks_per_sequence
        device = self.net.fuse.weight.device
        tokens = batch["tokens"].to(device)  # [B, L]
        lengths, starts = batch["lengths"], batch["starts"]
        batch_size, length = tokens.shape
        layers = self.tap_layers + ((self.target.num_layers,) if teacher else ())  # the last: final-normed
        with torch.no_grad():
            mask = (torch.arange(length)[None] < lengths[:, None]).long().to(device)
            taps = self.target.batch_taps(tokens, mask, layers)  # [B, L, n_layers*D]
            if teacher:
                width = self.target.hidden_size
                taps, final = taps[..., :-width], taps[..., -width:]  # [B, L, n_taps*D], [B, L, D]
        anchors, valid = sample_anchors(lengths, starts, nb, generator)  # [B, nb]
        anchors, valid = anchors.to(device), valid.to(device)
        labels = block_labels(tokens, lengths.to(device), anchors, valid, g)  # [B, nb, g-1]
        with self.autocast():
            ctx = self.net.fuse_context(taps.to(self.net.fuse.weight.dtype))  # [B, L, D]
            positions = torch.arange(length, device=device)[None].expand(batch_size, length)
            ctx_kv = self.net.context_kv(ctx, positions)
            known = self.target.embed_tokens(tokens.gather(1, anchors))  # [B, nb, D]
            block = self.net.block_inputs(known.to(ctx.dtype), self.net.mask_vector(self.target.embed_tokens))
            attn_mask = block_attention_mask(anchors, length, g)  # [B, 1, nb*g, L+nb*g]
            hidden = self.module(block, block_positions(anchors, g), ctx_kv, attn_mask)  # [B, nb*g, D]
            hidden = hidden.view(batch_size, nb, g, -1)[:, :, 1:]  # masked slots only
            logits = self.target.lm_head(hidden.to(self.target.dtype))  # [B, nb, g-1, V]
        if not teacher:
            return logits, labels
        with torch.no_grad():  # slot k (token anchor+k) is predicted by the target at position anchor+k-1
            where = (anchors[:, :, None] + torch.arange(g - 1, device=device)).clamp(max=length - 1)  # [B, nb, g-1]
            before = final.gather(1, where.flatten(1)[:, :, None].expand(-1, -1, final.shape[-1]))  # [B, nb*(g-1), D]
            teacher_logits = self.target.lm_head(before.view(batch_size, nb, g - 1, -1))  # [B, nb, g-1, V]
        return logits, labels, teacher_logits

    def export(self, folder: Path, train_data, extra: dict, dtype: torch.dtype) -> None:
        save_drafter(folder, self.net, self.tap_layers, recorded_signature(self.target), extra, dtype=dtype,
                     draft_vocab=_draft_vocab(self.cfg, train_data, self.target))


class DFlashTask(BlockDiffusionTask):
    """The block-diffusion drafter in DFlash's layout: q/k norms and a mask token of the target's vocabulary,
    so that vLLM and SGLang can serve it (drafters/dflash.py). Taps must lie in 1..L-1 (DFlash ids 0..L-2)."""

    kind = "dflash"

    def layout(self, cfg, target) -> dict:
        bad = [t for t in self.tap_layers if not 1 <= t <= target.num_layers - 1]
        if bad:
            raise DiffdraftError(f"a dflash drafter taps layers 1..{target.num_layers - 1} only, got {bad}")
        mask = cfg.mask_token_id if cfg.mask_token_id is not None else choose_mask_token(target.tokenizer,
                                                                                          target.vocab_size)
        if not 0 <= mask < target.vocab_size:
            raise DiffdraftError(f"mask token id {mask} is outside the target's vocabulary of {target.vocab_size}")
        return {"qk_norm": True, "mask_token_id": mask}


class MaskedDiffusionTask:
    kind = "masked-diffusion"

    def __init__(self, cfg, target, autocast):
        self.cfg, self.target, self.autocast = cfg, target, autocast
        net_cfg = MaskedDiffusionConfig(num_layers=cfg.num_layers, block_size=cfg.block_size, **layer_shape(target))
        self.net = MaskedDiffusionNet(net_cfg)
        self.net.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        if cfg.init_from:
            loaded, *_ = load_masked_net(cfg.init_from)
            _check_init(cfg, net_cfg, loaded.cfg, cfg.init_from)
            self.net.load_state_dict(loaded.state_dict())
        else:
            self.net.init_from_target(target.module)  # start as the target's first layers
        self.module = self.net

    def logits_and_labels(self, batch: dict[str, torch.Tensor], generator: torch.Generator, training: bool):
        """-> logits [B, nb, g-1, V], labels [B, nb, g-1] (IGNORE on slots left unmasked)."""
        g, nb = self.cfg.block_size, self.cfg.blocks_per_sequence
        device = self.net.mask_embedding.device
        tokens = batch["tokens"].to(device)  # [B, L]
        lengths, starts = batch["lengths"], batch["starts"]
        batch_size, length = tokens.shape
        anchors, valid = sample_anchors(lengths, starts, nb, generator)  # [B, nb]
        anchors, valid = anchors.to(device), valid.to(device)
        labels = block_labels(tokens, lengths.to(device), anchors, valid, g)  # [B, nb, g-1]
        if training:
            masked = sample_block_masking((batch_size, nb, g - 1), generator).to(device)  # [B, nb, g-1]
        else:
            masked = torch.ones_like(labels, dtype=torch.bool)
        masked = masked | (labels == IGNORE)  # slots past the end are never shown
        labels = labels.masked_fill(~masked, IGNORE)
        slots = block_positions(anchors, g)  # [B, nb*g]
        block_ids = tokens.gather(1, slots.clamp(max=length - 1))  # [B, nb*g]
        slot_masked = torch.cat([masked.new_zeros(batch_size, nb, 1), masked], dim=-1).view(batch_size, nb * g)
        with self.autocast():
            embed = self.target.embed_tokens
            x = torch.cat([embed(tokens), self.net.block_inputs(embed(block_ids), slot_masked)], dim=1)
            positions = torch.cat([torch.arange(length, device=device)[None].expand(batch_size, length), slots], dim=1)
            hidden, _ = self.module(x, positions, None, prefix_and_blocks_mask(anchors, length, g))
            hidden = hidden[:, length:].reshape(batch_size, nb, g, -1)[:, :, 1:]  # [B, nb, g-1, D]
            logits = self.target.lm_head(hidden.to(self.target.dtype))  # [B, nb, g-1, V]
        return logits, labels

    def export(self, folder: Path, train_data, extra: dict, dtype: torch.dtype) -> None:
        save_masked_drafter(folder, self.net, recorded_signature(self.target), extra, dtype=dtype,
                            draft_vocab=_draft_vocab(self.cfg, train_data, self.target),
                            denoise={"steps": 1, "order": "left-to-right"}, warmup={"drafter": "ngram", "tokens": 0})


def _draft_vocab(cfg, train_data, target) -> torch.Tensor | None:
    return frequent_tokens(train_data, cfg.draft_vocab, target.vocab_size) if cfg.draft_vocab > 0 else None


TASKS = {task.kind: task for task in (DFlashTask, BlockDiffusionTask, MaskedDiffusionTask)}
