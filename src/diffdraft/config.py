"""Configuration dataclasses: how to sample and how to draft.

Each one validates itself on construction, so a bad value fails early with a clear
message, and round-trips through plain dicts (JSON). Nothing here knows about models.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from diffdraft.errors import DiffdraftError

VERIFY_MODES = ("auto", "rejection", "point-mass")


@dataclass(frozen=True)
class SamplingConfig:
    """How the target's next-token distribution is shaped.

    temperature 0 means greedy decoding. top_k 0 and top_p 1.0 disable those filters.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature != self.temperature:
            raise DiffdraftError(f"temperature must be a number, got {self.temperature!r}")
        if self.temperature < 0:
            raise DiffdraftError(f"temperature must be >= 0, got {self.temperature}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise DiffdraftError(f"top_k must be an integer >= 0 (0 disables it), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not (0.0 < self.top_p <= 1.0):
            raise DiffdraftError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "SamplingConfig":
        return cls(**data)


@dataclass(frozen=True)
class DraftConfig:
    """How many tokens to draft per step and how to verify them.

    verify: "auto" picks greedy matching at temperature 0, rejection sampling when the
    drafter states its exact q, and point-mass matching otherwise.
    """

    draft_len: int = 16
    verify: str = "auto"

    def __post_init__(self) -> None:
        if isinstance(self.draft_len, bool) or not isinstance(self.draft_len, int) or not (0 <= self.draft_len <= 64):
            raise DiffdraftError(f"draft length must be an integer in [0, 64], got {self.draft_len!r}")
        if self.verify not in VERIFY_MODES:
            raise DiffdraftError(f"verify must be one of {', '.join(VERIFY_MODES)}, got {self.verify!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "DraftConfig":
        return cls(**data)
