"""Drafters, and build_drafter(): a drafter by name or from a checkpoint folder."""

from __future__ import annotations

from pathlib import Path

from diffdraft.drafters.base import Draft, Drafter
from diffdraft.drafters.block_diffusion import BlockDiffusionDrafter, target_signature
from diffdraft.drafters.checkpoint import is_checkpoint, read_config
from diffdraft.drafters.dflash import folder_tap_layers, is_dflash_folder
from diffdraft.drafters.early_exit import EarlyExitDrafter
from diffdraft.drafters.handoff import HandoffDrafter
from diffdraft.drafters.masked_diffusion import MaskedDiffusionDrafter, denoise_from_dict
from diffdraft.drafters.ngram import NgramDrafter
from diffdraft.errors import DiffdraftError

DRAFTER_NAMES = ("auto", "none", "ngram", "early-exit", "block-diffusion")
# "auto": the shipped block-diffusion drafter where it was trained for the target, n-gram elsewhere.
AUTO = "auto"
# The block-diffusion drafter trained for the default target, shipped in the package.
SHIPPED_DRAFTER = Path(__file__).resolve().parent.parent / "weights" / "smollm2-bd16"
# Options a masked-diffusion drafter folder takes after its path: FOLDER:steps=2:order=confidence
MASKED_OPTIONS = {"steps": int, "order": str, "select": str, "samples": int, "warmup": int, "warmup-drafter": str}

__all__ = ["Draft", "Drafter", "BlockDiffusionDrafter", "EarlyExitDrafter", "HandoffDrafter", "MaskedDiffusionDrafter",
           "NgramDrafter", "DRAFTER_NAMES", "build_drafter", "required_tap_layers"]


def parse_options(spec: str) -> tuple[str, dict[str, str]]:
    """`BASE:key=value:key=value` -> (BASE, {key: value}); a BASE that exists as a path is never split."""
    if Path(spec).exists() or ":" not in spec:
        return spec, {}
    base, *pairs = spec.split(":")
    options = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key or not value:
            raise DiffdraftError(f"bad drafter option {pair!r} in {spec!r}: write key=value")
        options[key] = value
    return base, options


def format_options(base: str, options: dict[str, str]) -> str:
    """The inverse of parse_options: BASE:key=value:..."""
    return base + "".join(f":{key}={value}" for key, value in options.items())


def required_tap_layers(specs, num_layers: int | None = None) -> tuple[int, ...] | None:
    """The target layers that the block-diffusion drafters among `specs` read (their sorted union),
    or None when none of them reads any. Read from the folders' configs, before the backend is built,
    so that it can be built with those taps. "auto" counts the shipped drafter's layers only where a
    target of `num_layers` layers has them (elsewhere it resolves to n-gram). A spec that is not a
    drafter is left for build_drafter to refuse."""
    layers: set[int] = set()
    for spec in specs:
        try:
            base, _ = parse_options(spec)
            folder = SHIPPED_DRAFTER if base in ("block-diffusion", AUTO) else Path(base)
            if folder.is_dir() and is_dflash_folder(folder):
                layers.update(folder_tap_layers(folder))
                continue
            if not (folder.is_dir() and is_checkpoint(folder)):
                continue
            config = read_config(folder)
            if config.get("kind") == BlockDiffusionDrafter.name:
                taps = {int(i) for i in config["tap_layers"]}
                if base != AUTO or num_layers is None or max(taps) <= num_layers:
                    layers.update(taps)
        except (DiffdraftError, KeyError, TypeError, ValueError):
            continue
    if num_layers is not None and layers and max(layers) > num_layers:
        raise DiffdraftError(f"a drafter among {list(specs)} does not fit this target of {num_layers} layers: it reads "
                             f"layer {max(layers)}{_trained_for_note(specs, num_layers)}")
    return tuple(sorted(layers)) or None


def _trained_for_note(specs, num_layers: int) -> str:
    """", trained for <target>" for the first drafter folder among specs that records a deeper target."""
    from diffdraft.drafters.block_diffusion import trained_for

    for spec in specs:
        folder = Path(parse_options(spec)[0])
        try:
            signature = read_config(folder).get("target") if folder.is_dir() and is_checkpoint(folder) else None
        except (DiffdraftError, OSError, ValueError):
            continue
        if signature and signature.get("num_layers", 0) > num_layers:
            return f", and was trained for {trained_for(signature)}"
    return ""


def shipped_drafter_fits(target) -> bool:
    """Whether the shipped block-diffusion drafter was trained for this target (its recorded target
    signature and tokenizer match); read from its config, no weights loaded."""
    config = read_config(SHIPPED_DRAFTER)
    signature, mine = config.get("target") or {}, target_signature(target)
    return all(signature.get(key) == mine[key] for key in mine) and set(config.get("tap_layers", [])) <= set(
        target.tap_layers)


def build_drafter(spec: str, target, early_exit_layers: int = 4) -> Drafter | None:
    """A drafter by name (auto, none, ngram, early-exit, block-diffusion) or a drafter checkpoint folder.

    "none" returns None: plain decoding. The drafter is checked against the target. A
    masked-diffusion folder takes options: FOLDER:steps=T:order=left-to-right|confidence:
    select=1,2,4 (self-selection among step counts):samples=K:warmup=N:warmup-drafter=ngram.
    """
    spec, options = parse_options(spec)
    if spec == "none":
        return None
    if spec == AUTO:
        spec = "block-diffusion" if shipped_drafter_fits(target) else "ngram"
    if spec == "ngram":
        drafter: Drafter = NgramDrafter()
    elif spec == "early-exit":
        drafter = EarlyExitDrafter(target, num_layers=early_exit_layers)
    elif spec == "block-diffusion":
        drafter = BlockDiffusionDrafter.load(SHIPPED_DRAFTER, target)
    elif Path(spec).is_dir() and is_dflash_folder(spec):
        drafter = BlockDiffusionDrafter.load_dflash(spec, target)
    elif Path(spec).is_dir():
        if not is_checkpoint(spec):
            raise DiffdraftError(f"{spec} is not a drafter folder (no drafter.json, and no DFlash config.json)")
        config = read_config(spec)
        kind = config["kind"]
        if kind == MaskedDiffusionDrafter.name:
            return _masked_diffusion(spec, config, options, target, early_exit_layers)
        if kind == EarlyExitDrafter.name:
            drafter = EarlyExitDrafter.load(spec, target)
        elif kind == BlockDiffusionDrafter.name:
            drafter = BlockDiffusionDrafter.load(spec, target)
        else:
            raise DiffdraftError(f"drafter in {spec} is of unknown kind {kind!r}")
    else:
        raise DiffdraftError(f"unknown drafter {spec!r}: use one of {', '.join(DRAFTER_NAMES)} or a drafter folder")
    if options:
        raise DiffdraftError(f"the {drafter.name} drafter takes no options, got {', '.join(options)}")
    return drafter


def _masked_diffusion(folder: str, config: dict, options: dict[str, str], target, early_exit_layers: int) -> Drafter:
    """A masked-diffusion drafter with its saved decoding settings, overridden by options; wrapped
    in a HandoffDrafter when it has warm-up tokens."""
    unknown = sorted(set(options) - set(MASKED_OPTIONS))
    if unknown:
        raise DiffdraftError(f"unknown masked-diffusion option(s) {', '.join(unknown)}: use {', '.join(MASKED_OPTIONS)}")
    try:
        values = {key: MASKED_OPTIONS[key](value) for key, value in options.items()}
        if "select" in values:
            values["select"] = tuple(int(t) for t in values["select"].split(","))
    except ValueError as err:
        raise DiffdraftError(f"bad masked-diffusion option value: {err}") from err
    denoise = dict(config.get("denoise") or {})
    for key, name in (("steps", "steps"), ("order", "order"), ("select", "candidates"), ("samples", "samples")):
        if key in values:
            denoise[name] = values[key]
    main = MaskedDiffusionDrafter.load(folder, target, denoise=denoise_from_dict(denoise))
    warmup = dict(config.get("warmup") or {})
    tokens = values.get("warmup", warmup.get("tokens", 0))
    if not isinstance(tokens, int) or tokens < 0:
        raise DiffdraftError(f"warm-up tokens must be an integer >= 0, got {tokens!r}")
    if tokens == 0:
        return main
    warmup_spec = values.get("warmup-drafter", warmup.get("drafter", "ngram"))
    return HandoffDrafter(build_drafter(warmup_spec, target, early_exit_layers), main, tokens)
