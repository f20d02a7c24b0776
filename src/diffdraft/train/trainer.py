"""Training loop for the diffusion drafters.

Each step: the task (train/tasks.py: block-diffusion or masked-diffusion) turns a batch of
regenerated sequences into logits and labels of many random blocks at once; the objective
(train/objectives.py: positional weighting by default, optionally focal, chain and the
two-stage alignment) turns them into a loss (docs/design.md, 'Training drafters'). AdamW with linear warm-up and cosine decay, gradient
clipping, bf16 autocast. Everything random is derived from (seed, step), so a run resumed
from a checkpoint (net + optimizer + step) continues exactly as an uninterrupted one.
Runs under torchrun with DDP (gloo on CPU, NCCL on GPU): ranks split each global batch.
"""

from __future__ import annotations

import json
import math
import os
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from diffdraft.config import TrainConfig
from diffdraft.errors import DiffdraftError
from diffdraft.files import atomic_folder, output_folder
from diffdraft.backends.hf import HFTarget
from diffdraft.target import TargetBackend
from diffdraft.train.data import Sequence, read_split
from diffdraft.train.losses import acceptance_counts, per_position_acceptance, positional_weights, simulated_tau, \
    weighted_block_loss
from diffdraft.train.objectives import Objective
from diffdraft.train.tasks import TASKS

AMP_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": None}


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to 10% of it at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def epoch_order(num_sequences: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Sequence indices of a step's global batch: the data in seeded per-epoch permutations, so the
    order is a pure function of (seed, step) and a resumed run sees the same batches."""
    indices = []
    for j in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(j, num_sequences)
        perm = torch.randperm(num_sequences, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        indices.append(int(perm[pos]))
    return indices


def autocast(device: torch.device, dtype: torch.dtype | None):
    """bf16/fp16 autocast on `device`, or nothing for dtype None (float32)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def optimizer_step(loss: torch.Tensor, net: torch.nn.Module, optimizer, lr: float, grad_clip: float) -> None:
    """One AdamW update at learning rate lr from `loss`, gradients clipped to norm grad_clip."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), grad_clip)
    optimizer.step()


def make_batch(sequences: list[Sequence], max_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tokens [B, L], lengths [B], first anchor [B] (the response's first token)."""
    cut = [s.tokens[:max_len] for s in sequences]
    width = max(len(t) for t in cut)
    tokens = torch.full((len(cut), width), pad_id, dtype=torch.long)
    for row, t in enumerate(cut):
        tokens[row, : len(t)] = torch.tensor(t)
    return {
        "tokens": tokens,
        "lengths": torch.tensor([len(t) for t in cut]),
        "starts": torch.tensor([s.prompt_len for s in sequences]),
    }


class DrafterTrainer:
    """Owns the frozen target, the drafter net, the optimizer and the data order."""

    def __init__(self, cfg: TrainConfig, target: TargetBackend, train_data: list[Sequence], eval_data: list[Sequence]):
        self.cfg = cfg
        self.target = target
        self.device = torch.device(cfg.device)
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        if cfg.batch_size % self.world:
            raise DiffdraftError(f"batch size {cfg.batch_size} must divide evenly over {self.world} processes")
        self.train_data = [s for s in train_data if len(s.tokens) - s.prompt_len >= 2]
        self.eval_data = eval_data[: cfg.eval_sequences]
        if not self.train_data:
            raise DiffdraftError("no training sequence has a response of at least 2 tokens")
        if cfg.kind == "masked-diffusion" and (cfg.focal_lambda or cfg.chain_weight or cfg.align_fraction
                                               or cfg.distill_weight):
            raise DiffdraftError("the masked-diffusion drafter trains with the masked-diffusion objective: "
                                 "focal, chain, distillation and alignment terms assume fully masked blocks")
        self.task = TASKS[cfg.kind](cfg, target, self._autocast)
        self.net = self.task.net
        self.net.to(self.device)
        self.model = self.net
        if self.world > 1:
            self.model = torch.nn.parallel.DistributedDataParallel(self.net)
        self.task.module = self.model
        decay = [p for n, p in self.net.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.net.named_parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr, betas=(0.9, 0.95), fused=False,
        )
        self.objective = Objective.from_config(cfg)
        self.step = 0
        pad = target.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else next(iter(target.eos_token_ids))

    # ----- data order: a pure function of (seed, step) -----
    def batch_indices(self, step: int) -> list[int]:
        """This rank's share of the step's sequence indices."""
        return epoch_order(len(self.train_data), self.cfg.batch_size, step, self.cfg.seed)[self.rank :: self.world]

    def _autocast(self):
        return autocast(self.device, AMP_DTYPES[self.cfg.amp_dtype])

    def train_step(self) -> float:
        self.model.train()
        batch = make_batch([self.train_data[i] for i in self.batch_indices(self.step)], self.cfg.max_len, self.pad_id)
        generator = torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step * 17 + self.rank)
        if self.objective.distill_weight:
            logits, labels, teacher = self.task.logits_and_labels(batch, generator, training=True, teacher=True)
        else:
            (logits, labels), teacher = self.task.logits_and_labels(batch, generator, training=True), None
        loss = self.objective.loss(logits, labels, self.objective.stage(self.step, self.cfg.steps), generator,
                                   teacher=teacher)
        optimizer_step(loss, self.net, self.optimizer, learning_rate(self.cfg, self.step), self.cfg.grad_clip)
        self.step += 1
        return float(loss.detach())

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Held-out loss, per-position greedy acceptance and simulated tau (fixed anchors).

        eval_loss is the plain (uniform) cross-entropy over the masked slots, whatever the
        training objective, so runs with different objectives compare.
        """
        self.net.eval()
        generator = torch.Generator().manual_seed(12345)
        losses, prefixes, scorables = [], [], []
        uniform = positional_weights(self.cfg.block_size - 1, None)
        for start in range(0, len(self.eval_data), self.cfg.batch_size):
            batch = make_batch(self.eval_data[start : start + self.cfg.batch_size], self.cfg.max_len, self.pad_id)
            logits, labels = self.task.logits_and_labels(batch, generator, training=False)
            losses.append(float(weighted_block_loss(logits, labels, uniform)))
            prefix, scorable = acceptance_counts(logits, labels)
            prefixes.append(prefix.cpu())
            scorables.append(scorable.cpu())
        prefix, scorable = torch.cat(prefixes), torch.cat(scorables)
        return {
            "eval_loss": sum(losses) / len(losses),
            "sim_tau": simulated_tau(prefix),
            "acceptance": [round(r, 4) for r in per_position_acceptance(prefix, scorable, self.cfg.block_size - 1)],
        }

    # ----- checkpoints -----
    def save_checkpoint(self, folder: Path) -> None:
        optim = self.optimizer.state_dict()
        tensors = {f"net.{k}": v for k, v in self.net.state_dict().items()}
        for index, state in optim["state"].items():
            for key, value in state.items():
                tensors[f"optim.{index}.{key}"] = torch.as_tensor(value)
        with atomic_folder(folder) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
            (tmp / "trainer.json").write_text(json.dumps(
                {"step": self.step, "config": self.cfg.to_dict(), "param_groups": optim["param_groups"]}, indent=2))

    def load_checkpoint(self, folder: Path) -> None:
        try:
            meta = json.loads((folder / "trainer.json").read_text())
            tensors = load_file(str(folder / "state.safetensors"))
        except Exception as err:
            raise DiffdraftError(f"cannot resume from damaged checkpoint {folder}: {err}") from err
        self.net.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("net.")})
        state: dict[int, dict] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value.to(self.device)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
        self.step = int(meta["step"])

    def export(self, folder: Path, extra: dict) -> None:
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[self.cfg.save_dtype]
        self.task.export(folder, self.train_data, extra, dtype)


def train(cfg: TrainConfig, target: TargetBackend | None = None, log=print) -> dict:
    """Run (or resume) a training run in cfg.out; returns the final evaluation. A run that fails before
    writing anything leaves no folder behind."""
    with output_folder(cfg.out):
        return _train(cfg, target, log)


def _train(cfg: TrainConfig, target: TargetBackend | None, log) -> dict:
    from diffdraft.loading import load_model

    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not dist.is_initialized():
        dist.init_process_group("nccl" if cfg.device.startswith("cuda") else "gloo")
    out = Path(cfg.out)
    if target is None:
        model, tokenizer = load_model(cfg.model, dtype="float32")
        model.to(cfg.device)
        if cfg.device.startswith("cuda") and cfg.amp_dtype != "float32":
            model.to(AMP_DTYPES[cfg.amp_dtype])
        target = HFTarget(model, tokenizer, name=cfg.model or "smollm2")  # training runs the module, no decoding
    trainer = DrafterTrainer(cfg, target, read_split(Path(cfg.data), "train"), read_split(Path(cfg.eval_data or cfg.data), "eval"))
    checkpoint = out / "checkpoint"
    if (checkpoint / "trainer.json").is_file():
        trainer.load_checkpoint(checkpoint)
        log(f"resumed from {checkpoint} at step {trainer.step}")
    main = trainer.rank == 0
    start, tokens_seen = time.perf_counter(), 0
    history = out / "log.jsonl"
    result: dict = {}
    while trainer.step < cfg.steps:
        loss = trainer.train_step()
        tokens_seen += cfg.batch_size * cfg.blocks_per_sequence * (cfg.block_size - 1)
        last = trainer.step == cfg.steps
        if main and (trainer.step % cfg.eval_every == 0 or last):
            result = {"step": trainer.step, "loss": round(loss, 4), **trainer.evaluate(),
                      "elapsed_s": round(time.perf_counter() - start, 1), "predicted_tokens": tokens_seen}
            log(json.dumps(result))
            with history.open("a") as f:
                f.write(json.dumps(result) + "\n")
        if main and (trainer.step % cfg.save_every == 0 or last):
            trainer.save_checkpoint(checkpoint)
    if main:
        trainer.export(out / "drafter", extra={"config": cfg.to_dict(), "final": result})
    if distributed:
        dist.barrier()
    return result
