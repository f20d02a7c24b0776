"""Converting the AR target into a block-diffusion LM (and training a dLLM drafter) by LoRA.

Each training sequence (prompt + the target's own response, from `diffdraft data`) becomes
one pass over [clean tokens | noisy response blocks] under masks.training_mask: the prompt
is causal, the response is cut into blocks of b tokens (the last one padded with the end
token when the response ended, dropped when it was cut off), clean blocks see the prompt,
the earlier clean blocks and themselves, and each noisy block sees the prompt, the clean
blocks before it and itself. Every noisy block draws a masking ratio r ~ U(0, 1) and masks
each slot with probability r (at least one); the loss is the cross-entropy of the true
token at the masked slots, averaged over them, each slot predicted from the position
before it (model.slot_hidden): slot 0 of a noisy block from the clean token before the
block, slot i from noisy slot i-1. A sequence needs a prompt of at least one token. Only
the LoRA adapters and the mask embedding learn; the base model is frozen. AdamW with warm-up and cosine decay, gradient
clipping, bf16 autocast, and everything random derived from (seed, step), so a run
resumed from its checkpoint (adapters + optimizer + step) continues as an uninterrupted
one. With `num_layers` set, the same recipe trains the cheap dLLM drafter (the base's first
layers and head), optionally starting from a converted target's adapters (`init_from`).
Single process. Knows nothing of decoding or verification.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from diffdraft.files import output_folder
from diffdraft.config import check_training_basics, resolve_amp
from diffdraft.dllm.checkpoint import check_kind_and_format, save_dllm
from diffdraft.dllm.masks import training_mask
from diffdraft.dllm.model import MASK_ID, BlockDiffusionLM, DLLMConfig
from diffdraft.drafters.block_diffusion import target_signature
from diffdraft.drafters.checkpoint import read_checkpoint
from diffdraft.errors import DiffdraftError
from diffdraft.backends.hf import HFTarget
from diffdraft.target import TargetBackend
from diffdraft.train.data import Sequence, read_split
from diffdraft.train.masks import IGNORE, sample_block_masking
from diffdraft.train.trainer import (
    AMP_DTYPES,
    DrafterTrainer,
    autocast,
    epoch_order,
    learning_rate,
    optimizer_step,
)

SAVE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class DLLMTrainConfig:
    """One conversion (or drafter) run; field names follow TrainConfig where they mean the same."""

    data: str  # folder of train-/eval- shards from `diffdraft data`
    out: str  # run folder: checkpoint/, adapter/, log.jsonl
    model: str | None = None  # base model spec (default SmolLM2-135M-Instruct)
    block_size: int = 4
    num_layers: int | None = None  # None: the whole model (the target); n: a drafter of the first n layers
    rank: int = 8
    alpha: float = 16.0
    init_from: str | None = None  # a converted dLLM folder whose matching tensors start this run
    batch_size: int = 16
    max_len: int = 512
    steps: int = 1000
    lr: float = 3e-4
    warmup_steps: int = 50
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    eval_every: int = 100
    eval_sequences: int = 64
    save_every: int = 100
    seed: int = 0
    device: str = "cpu"
    amp: str = "auto"  # autocast dtype; auto = bfloat16 on CUDA, none (float32) elsewhere: CPU bf16 is slow here
    save_dtype: str = "bfloat16"

    def __post_init__(self) -> None:
        DLLMConfig(block_size=self.block_size, num_layers=self.num_layers, rank=self.rank, alpha=self.alpha)
        check_training_basics(self, ("batch_size", "max_len", "steps", "eval_every", "eval_sequences", "save_every"))
        if self.save_dtype not in SAVE_DTYPES:
            raise DiffdraftError(f"save dtype must be one of {', '.join(SAVE_DTYPES)}, got {self.save_dtype!r}")

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[resolve_amp(self.amp, self.device)]

    def dllm(self) -> DLLMConfig:
        return DLLMConfig(block_size=self.block_size, num_layers=self.num_layers, rank=self.rank, alpha=self.alpha)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def response_blocks(seq: Sequence, max_len: int, block_size: int, eos_id: int) -> tuple[list[int], list[int]]:
    """(prompt, response cut into whole blocks): an ended response is padded with eos, a cut-off one trimmed."""
    tokens = seq.tokens[:max_len]
    prompt, response = tokens[: seq.prompt_len], tokens[seq.prompt_len :]
    ended = len(seq.tokens) <= max_len and bool(response) and response[-1] == eos_id
    if ended:
        response = response + [eos_id] * (-len(response) % block_size)
    else:
        response = response[: len(response) - len(response) % block_size]
    return prompt, response


def make_block_batch(
    sequences: list[Sequence], max_len: int, block_size: int, eos_id: int, generator: torch.Generator | None
) -> dict[str, torch.Tensor]:
    """Inputs of one training pass.

    ids/positions [B, W], mask [B, 1, W, W], labels [B, W] (IGNORE but at masked slots), and
    sources [B, W]: the row whose hidden state predicts each labelled slot (see slot_hidden).
    """
    b = block_size
    parts = [response_blocks(s, max_len, b, eos_id) for s in sequences]
    clean_width = max(len(p) + len(r) for p, r in parts)
    noisy_width = max(len(r) for _, r in parts)
    width = clean_width + noisy_width
    ids = torch.full((len(parts), width), eos_id, dtype=torch.long)
    positions = torch.zeros(len(parts), width, dtype=torch.long)
    labels = torch.full((len(parts), width), IGNORE, dtype=torch.long)
    sources = torch.zeros(len(parts), width, dtype=torch.long)
    masks = []
    masked = sample_block_masking((len(parts), noisy_width // b, b), generator).reshape(len(parts), noisy_width)
    for row, (prompt, response) in enumerate(parts):
        p, r = len(prompt), len(response)
        ids[row, : p + r] = torch.tensor(prompt + response)
        positions[row, : p + r] = torch.arange(p + r)
        noisy = torch.tensor(response, dtype=torch.long)
        hidden = masked[row, :r]
        ids[row, clean_width : clean_width + r] = torch.where(hidden, MASK_ID, noisy)
        positions[row, clean_width : clean_width + r] = torch.arange(p, p + r)
        labels[row, clean_width : clean_width + r] = torch.where(hidden, noisy, IGNORE)
        if p < 1:
            raise DiffdraftError("a training sequence needs a prompt: slot 0 is predicted from the token before it")
        slot = torch.arange(r)
        before_block = p + slot - 1  # the clean row of the token just before the slot's block (slot 0's source)
        sources[row, clean_width : clean_width + r] = torch.where(slot % b == 0, before_block, clean_width + slot - 1)
        masks.append(training_mask(p, r // b, b, clean_width, noisy_width))
    return {"ids": ids, "positions": positions, "mask": torch.stack(masks)[:, None], "labels": labels,
            "sources": sources}


class DLLMTrainer:
    """Owns the frozen base (through `target`), the adapters, the optimizer and the data order."""

    # Checkpoints hold net + optimizer + step exactly as the drafter trainer's do (no pickle).
    save_checkpoint = DrafterTrainer.save_checkpoint
    load_checkpoint = DrafterTrainer.load_checkpoint

    def __init__(self, cfg: DLLMTrainConfig, target: TargetBackend, train_data: list[Sequence], eval_data: list[Sequence]):
        self.cfg = cfg
        self.target = target
        self.device = torch.device(cfg.device)
        self.eos_id = min(target.eos_token_ids) if target.eos_token_ids else 0
        usable = [s for s in train_data if self._trainable(s)]
        if not usable:
            raise DiffdraftError(f"no training sequence has a whole block of {cfg.block_size} response tokens")
        self.train_data = usable
        self.eval_data = [s for s in eval_data if self._trainable(s)][: cfg.eval_sequences]
        self.net = BlockDiffusionLM(target.module, cfg.dllm())
        self.net.reset_parameters(torch.Generator().manual_seed(cfg.seed))
        if cfg.init_from:
            self._init_from(Path(cfg.init_from))
        self.net.to(self.device)
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=cfg.lr, betas=(0.9, 0.95),
                                           weight_decay=cfg.weight_decay)
        self.step = 0

    def _trainable(self, seq: Sequence) -> bool:
        """A prompt (slot 0 is predicted from its last token) and at least one whole response block."""
        return bool(seq.prompt_len) and bool(response_blocks(seq, self.cfg.max_len, self.cfg.block_size,
                                                             self.eos_id)[1])

    def _init_from(self, folder: Path) -> None:
        """Start from another conversion's tensors wherever names and shapes agree (its first layers)."""
        config, tensors = read_checkpoint(folder)
        check_kind_and_format(config, folder)
        own = self.net.state_dict()
        picked = {k: v for k, v in tensors.items() if k in own and own[k].shape == v.shape}
        if "mask_embedding" not in picked:
            raise DiffdraftError(f"{folder} does not fit this model: no usable mask embedding")
        self.net.load_state_dict({**own, **{k: v.float() for k, v in picked.items()}})

    def batch_indices(self, step: int) -> list[int]:
        return epoch_order(len(self.train_data), self.cfg.batch_size, step, self.cfg.seed)

    def loss(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean cross-entropy at the masked slots, and the greedy accuracy there."""
        labels = batch["labels"].to(self.device)  # [B, W]
        with autocast(self.device, self.cfg.amp_dtype):
            hidden, _ = self.net(batch["ids"], batch["positions"], batch["mask"])  # [B, W, D]
            picked = labels != IGNORE  # [B, W]
            rows = picked.nonzero()[:, 0]  # [M] batch row of each labelled slot
            predictors = hidden[rows, batch["sources"].to(self.device)[picked]]  # [M, D]
            logits = self.net.logits(predictors).float()  # [M, V]
        target = labels[picked]
        return F.cross_entropy(logits, target), (logits.argmax(dim=-1) == target).float().mean()

    def train_step(self) -> float:
        self.net.train()
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step * 17)
        sequences = [self.train_data[i] for i in self.batch_indices(self.step)]
        loss, _ = self.loss(make_block_batch(sequences, self.cfg.max_len, self.cfg.block_size, self.eos_id, generator))
        optimizer_step(loss, self.net, self.optimizer, learning_rate(self.cfg, self.step), self.cfg.grad_clip)
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out masked-slot loss and accuracy under a fixed masking."""
        self.net.eval()
        if not self.eval_data:
            return {}
        generator = torch.Generator().manual_seed(12345)
        losses, accuracies = [], []
        for start in range(0, len(self.eval_data), self.cfg.batch_size):
            chunk = self.eval_data[start : start + self.cfg.batch_size]
            loss, accuracy = self.loss(make_block_batch(chunk, self.cfg.max_len, self.cfg.block_size, self.eos_id,
                                                        generator))
            losses.append(float(loss))
            accuracies.append(float(accuracy))
        return {"eval_loss": round(sum(losses) / len(losses), 4), "eval_accuracy": round(sum(accuracies) / len(accuracies), 4)}

    def export(self, folder: Path, extra: dict) -> None:
        save_dllm(folder, self.net, target_signature(self.target), extra, dtype=SAVE_DTYPES[self.cfg.save_dtype])


def _check_resumable(folder: Path, cfg: DLLMTrainConfig) -> None:
    try:
        saved = json.loads((folder / "trainer.json").read_text())["config"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DiffdraftError(f"cannot resume from damaged checkpoint {folder}: {err}") from err
    for key in ("block_size", "num_layers", "rank", "alpha"):
        if saved.get(key) != getattr(cfg, key):
            raise DiffdraftError(f"checkpoint {folder} was trained with {key} {saved.get(key)}, this run asks for "
                                 f"{getattr(cfg, key)}: use another --out")


def train_dllm(cfg: DLLMTrainConfig, target: TargetBackend | None = None, log=print) -> dict:
    """Run (or resume) a conversion run in cfg.out; the adapters end up in cfg.out/adapter. A run that
    fails before writing anything leaves no folder behind."""
    with output_folder(cfg.out):
        return _train_dllm(cfg, target, log)


def _train_dllm(cfg: DLLMTrainConfig, target: TargetBackend | None, log) -> dict:
    from diffdraft.loading import load_model

    out = Path(cfg.out)
    train_data, eval_data = read_split(Path(cfg.data), "train"), read_split(Path(cfg.data), "eval")
    if target is None:
        model, tokenizer = load_model(cfg.model, dtype="float32")
        model.to(cfg.device)
        if cfg.device.startswith("cuda") and cfg.amp_dtype is not None:
            model.to(cfg.amp_dtype)
        target = HFTarget(model, tokenizer, name=cfg.model or "smollm2")  # training runs the module, no decoding
    trainer = DLLMTrainer(cfg, target, train_data, eval_data)
    checkpoint = out / "checkpoint"
    if (checkpoint / "trainer.json").is_file():
        _check_resumable(checkpoint, cfg)
        trainer.load_checkpoint(checkpoint)
        log(f"resumed from {checkpoint} at step {trainer.step}")
    start = time.perf_counter()
    result: dict = {}
    while trainer.step < cfg.steps:
        loss = trainer.train_step()
        last = trainer.step == cfg.steps
        if trainer.step % cfg.eval_every == 0 or last:
            result = {"step": trainer.step, "loss": round(loss, 4), **trainer.evaluate(),
                      "elapsed_s": round(time.perf_counter() - start, 1)}
            log(json.dumps(result))
            with (out / "log.jsonl").open("a") as f:
                f.write(json.dumps(result) + "\n")
        if trainer.step % cfg.save_every == 0 or last:
            trainer.save_checkpoint(checkpoint)
    if not result:  # resumed after its last step: nothing ran, so evaluate what is exported
        result = {"step": trainer.step, **trainer.evaluate()}
    trainer.export(out / "adapter", extra={"config": cfg.to_dict(), "final": result})
    return result
