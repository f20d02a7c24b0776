"""Drafter checkpoints on disk: a folder with drafter.json (config) and drafter.safetensors.

Writes are atomic (temporary folder, then rename) so an interruption never leaves a
half-written drafter; reads turn every kind of damage into one clear DiffdraftError.
No pickle anywhere. Knows nothing about what the tensors mean.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from diffdraft.errors import DiffdraftError
from diffdraft.files import atomic_folder

CONFIG_FILE = "drafter.json"
WEIGHTS_FILE = "drafter.safetensors"


def write_checkpoint(
    folder: str | Path, config: dict, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> None:
    """Write config and tensors (floating ones stored in `dtype`) into `folder`, replacing it atomically."""
    with atomic_folder(folder) as tmp:
        stored = {k: (v.to(dtype) if v.is_floating_point() else v).detach().contiguous().cpu() for k, v in tensors.items()}
        save_file(stored, str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def update_config(folder: str | Path, changes: dict) -> dict:
    """Set keys of a drafter folder's config, rewriting only drafter.json, atomically; returns the config."""
    config = read_config(folder)
    config.update(changes)
    path = Path(folder) / CONFIG_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(config, indent=2) + "\n")
    tmp.replace(path)
    return config


def is_checkpoint(folder: str | Path) -> bool:
    return (Path(folder) / CONFIG_FILE).is_file()


def read_config(folder: str | Path) -> dict:
    """The config of a drafter folder (cheap: no tensors), turning any damage into a DiffdraftError."""
    folder = Path(folder)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    if not config_path.is_file() or not weights_path.is_file():
        raise DiffdraftError(f"{folder} is not a drafter folder: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DiffdraftError(f"corrupt drafter config {config_path}: {err}") from err
    if not isinstance(config, dict) or not isinstance(config.get("kind"), str):
        raise DiffdraftError(f"corrupt drafter config {config_path}: expected a JSON object with a 'kind'")
    return config


def read_checkpoint(folder: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a drafter folder (config and tensors), turning any damage into a DiffdraftError."""
    config = read_config(folder)
    weights_path = Path(folder) / WEIGHTS_FILE
    try:
        tensors = load_file(str(weights_path))
    except Exception as err:  # safetensors raises its own error types on a damaged file
        raise DiffdraftError(f"corrupt drafter weights {weights_path}: {err}") from err
    return config, tensors
