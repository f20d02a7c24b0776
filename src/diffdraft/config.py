"""Configuration dataclasses: how to sample and how to draft.

Each one validates itself on construction, so a bad value fails early with a clear
message, and round-trips through plain dicts (JSON). Nothing here knows about models.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

from diffdraft.errors import DiffdraftError

VERIFY_MODES = ("auto", "rejection", "point-mass")
MAX_TREE_NODES = 31  # a tree and its root fit the lean runtime's row-by-row (bit-identical) forward
LENGTH_MODES = ("auto", "fixed")
PROPOSAL_MODES = ("argmax", "sample")
# dflash: the block-diffusion drafter in DFlash's layout (q/k norms, a mask token of the target's vocabulary),
# exportable to vLLM and SGLang (drafters/dflash.py); the default for new drafters.
TRAINABLE_KINDS = ("dflash", "block-diffusion", "masked-diffusion")
# The block-diffusion objective terms a run gets unless told otherwise: with positional
# weighting (gamma 7) the best row of the objective ablation (results/ablation-mtbench).
BEST_OBJECTIVE = {"focal_lambda": 1.0, "chain_weight": 1.0}
AMP_CHOICES = ("auto", "bfloat16", "float16", "float32")


def check_threads(threads) -> int:
    """Torch threads: a positive integer up to this machine's cores (more only make threads wait for
    each other, and the cost measurement then runs for minutes)."""
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise DiffdraftError(f"threads must be a positive integer, got {threads!r}")
    cores = os.cpu_count() or 1
    if threads > cores:
        raise DiffdraftError(f"this machine has {cores} cores, so at most {cores} threads; got {threads}")
    return threads


def check_training_basics(config, positive_ints: tuple[str, ...]) -> None:
    """The checks every training config shares: counts that must be positive integers, a positive
    learning rate, a known autocast setting."""
    for name in positive_ints:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DiffdraftError(f"{name.replace('_', ' ')} must be a positive integer, got {value!r}")
    if not config.lr > 0:
        raise DiffdraftError(f"learning rate must be positive, got {config.lr}")
    if config.amp not in AMP_CHOICES:
        raise DiffdraftError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {config.amp!r}")


def resolve_amp(amp: str, device: str) -> str:
    """The autocast dtype a training run uses: "auto" is bfloat16 on CUDA and float32 elsewhere
    (bf16 matmuls on a CPU without bf16 units are emulated: one drafter training step of 4 sequences x
    8 blocks x 256 tokens took about 40 s in bf16 and 6 s in float32 here)."""
    if amp != "auto":
        return amp
    return "bfloat16" if device.startswith("cuda") else "float32"


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next-token distribution is shaped.

    temperature 0 means greedy decoding. top_k 0 and top_p 1.0 disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) \
                or not math.isfinite(self.temperature):
            raise DiffdraftError(f"temperature must be a finite number, got {self.temperature!r}")
        if self.temperature < 0:
            raise DiffdraftError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise DiffdraftError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise DiffdraftError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingConfig":
        return cls(**data)


# The most tokens drafted per step, everywhere a default is needed (the API, generate, serve, bench): the
# shipped block-diffusion drafter fills 15 slots per pass (a block of 16 holds the last token too), and the
# length rule verifies fewer where rows are dear.
DEFAULT_DRAFT_LEN = 15


@dataclass(frozen=True)
class DraftConfig:
    """How many tokens to draft per step and how to verify them.

    verify: "auto" picks greedy matching at temperature 0, rejection sampling when the
    drafter states its exact q, and point-mass matching otherwise.
    """

    draft_len: int = DEFAULT_DRAFT_LEN  # the most tokens drafted per step
    verify: str = "auto"
    # "auto": verify the number of drafted tokens that maximizes expected tokens per second on this
    # machine (draft_length.py); "fixed": verify all draft_len of them.
    length: str = "auto"
    # > 0: instead, cut each draft after its longest prefix whose confidence product (the drafter's own
    # probability that the whole prefix is right) stays >= this; a verify forward then carries
    # only tokens likely to pass. Lossless: the cut depends only on the drafter's distributions.
    min_confidence: float = 0.0
    # Above temperature 0: "sample" draws each slot from the drafter's q (verified by rejection
    # sampling); "argmax" proposes each slot's most likely token (q is then a point mass, and rejection
    # sampling reduces to point-mass matching). "sample" is the default because it measured ahead with
    # the shipped drafter at T=1 (8 MT-Bench questions, SmolLM2, lean runtime: tau 1.62 vs 1.37,
    # 1.24x vs 1.12x plain): its q was trained on the target's own sampled answers, so sum min(p, q)
    # exceeds p(argmax q).
    proposals: str = "sample"
    # > 0: verify a draft tree of at most this many nodes (draft_tree.py) where the drafter states its
    # alternatives per slot and the target takes trees; the length rule then sizes the tree. 0: a chain.
    tree: int = 0
    # In a tree, also the n-gram lookup's continuation (what followed the last earlier occurrence of the
    # context's suffix) as a branch from the root, valued by its own calibrated acceptance. Off by default:
    # on 16 MT-Bench questions (T = 0, native weights, 2 CPU threads) it lifted a fixed 8-node tree's tau
    # from 2.07 to 2.33, but with the length rule it cost speed (0.86x against 0.98x plain decoding).
    lookup: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.lookup, bool):
            raise DiffdraftError(f"lookup must be true or false, got {self.lookup!r}")
        if isinstance(self.tree, bool) or not isinstance(self.tree, int) or not (0 <= self.tree <= MAX_TREE_NODES):
            raise DiffdraftError(f"tree must be an integer in [0, {MAX_TREE_NODES}] (nodes; 0: a chain), "
                                 f"got {self.tree!r}")
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or not (0 <= self.draft_len <= 64):
            raise DiffdraftError(f"draft length must be an integer in [0, 64], got {self.draft_len!r}")
        if isinstance(self.min_confidence, bool) or not isinstance(self.min_confidence, (int, float)) \
                or not 0.0 <= self.min_confidence < 1.0:
            raise DiffdraftError(f"min confidence must be in [0, 1), got {self.min_confidence!r}")
        if self.length not in LENGTH_MODES:
            raise DiffdraftError(f"length must be one of {', '.join(LENGTH_MODES)}, got {self.length!r}")
        if self.proposals not in PROPOSAL_MODES:
            raise DiffdraftError(f"proposals must be one of {', '.join(PROPOSAL_MODES)}, got {self.proposals!r}")
        if self.verify not in VERIFY_MODES:
            raise DiffdraftError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DraftConfig":
        return cls(**data)


@dataclass(frozen=True)
class TrainConfig:
    """Training of a block-diffusion drafter (see train/trainer.py)."""

    data: str  # folder of train-/eval- shards from `diffdraft data`
    out: str  # run folder: checkpoint/, drafter/, log.jsonl
    model: str | None = None  # target spec (default SmolLM2-135M-Instruct)
    num_layers: int = 2
    block_size: int = 16
    tap_layers: tuple[int, ...] | None = None  # None: 1, L/2, L-3
    blocks_per_sequence: int = 16
    batch_size: int = 8
    max_len: int = 512
    steps: int = 1000
    lr: float = 6e-4
    warmup_steps: int = 50
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    gamma: float | None = 7.0  # positional weighting; None = uniform
    eval_every: int = 100
    eval_sequences: int = 64
    save_every: int = 100
    seed: int = 0
    device: str = "cpu"
    amp: str = "auto"  # autocast dtype, "float32" for none; auto: see resolve_amp
    save_dtype: str = "float32"  # dtype of the exported drafter weights
    draft_vocab: int = 0  # >0: the drafter proposes only the N most frequent training tokens
    kind: str = "dflash"  # "block-diffusion" (the original layout), or "masked-diffusion" (no target features)
    mask_token_id: int | None = None  # dflash: the target token used as MASK (None: drafters/dflash.choose_mask_token)
    init_from: str | None = None  # a drafter folder of the same kind to start from (fine-tuning)
    eval_data: str | None = None  # held-out shards from another data folder (default: `data`'s own)
    # Objective pieces (train/objectives.py); None takes the kind's default (BEST_OBJECTIVE).
    focal_lambda: float | None = None  # extra weight on each block's first wrong slot
    chain_weight: float | None = None  # weight of the chain loss (-log expected accepted length)
    align_fraction: float = 0.0  # last fraction of the steps run as stage II of the two-stage alignment
    align_alpha: float = 1.01
    align_max_masked: int = 96
    distill_weight: float = 0.0  # weight of the KL to the target's full next-token law (soft labels)

    def __post_init__(self) -> None:
        if self.block_size < 2 or self.block_size > 64:
            raise DiffdraftError(f"block size must be in [2, 64], got {self.block_size}")
        check_training_basics(self, ("num_layers", "blocks_per_sequence", "batch_size", "steps", "eval_every",
                                     "save_every"))
        if self.gamma is not None and not self.gamma > 0:
            raise DiffdraftError(f"gamma must be positive, got {self.gamma}")
        if self.kind not in TRAINABLE_KINDS:
            raise DiffdraftError(f"drafter kind must be one of {', '.join(TRAINABLE_KINDS)}, got {self.kind!r}")
        for name, best in BEST_OBJECTIVE.items():
            if getattr(self, name) is None:  # the masked-diffusion objective has no such terms
                object.__setattr__(self, name, best if self.kind != "masked-diffusion" else 0.0)
        for name in ("focal_lambda", "chain_weight", "distill_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise DiffdraftError(f"{name.replace('_', ' ')} must be a finite number >= 0, got {value!r}")
        if not 0.0 <= self.align_fraction < 1.0:
            raise DiffdraftError(f"align fraction must be in [0, 1), got {self.align_fraction}")
        if not self.align_alpha > 0 or self.align_max_masked < 1:
            raise DiffdraftError("align alpha must be positive and align max masked at least 1")

    @property
    def amp_dtype(self) -> str:
        """The autocast dtype this run uses, "auto" resolved by device."""
        return resolve_amp(self.amp, self.device)

    def to_dict(self) -> dict:
        data = dataclasses.asdict(self)
        data["tap_layers"] = list(self.tap_layers) if self.tap_layers is not None else None
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        data = dict(data)
        if data.get("tap_layers") is not None:
            data["tap_layers"] = tuple(data["tap_layers"])
        return cls(**data)
