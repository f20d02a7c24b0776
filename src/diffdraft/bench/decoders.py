"""The bench's decoders: drafter entries on the command line turned into diffdraft.decoding decoders.

An entry is `SPEC`, `SPEC@G` (its own draft length) or `SPEC:cut=C:length=L:propose=P`
(engine settings); "none" is plain decoding, always first as the reference of every
speedup and equality. The dLLM's decoders (its own blockwise decoding, then SimSD) come
from one converted target. Peers live in peers.py. The decoders themselves live in
diffdraft.decoding; this module only names and builds them. Knows nothing of prompt
suites, records or reports.
"""

from __future__ import annotations

from pathlib import Path

from diffdraft.config import DraftConfig
from diffdraft.decoding import PLAIN, DLLMDecoder, EngineDecoder
from diffdraft.dllm.loading import dllm_runners
from diffdraft.dllm.runner import DLLMRunner
from diffdraft.drafters import build_drafter, format_options, parse_options
from diffdraft.errors import DiffdraftError
from diffdraft.target import TargetBackend

__all__ = ["PLAIN", "dllm_decoders", "engine_decoders", "parse_drafter_spec", "split_engine_options"]


def dllm_decoders(target: TargetBackend, spec: str, drafter: str | None, drafter_layers: int | None,
                  block_size: int | None, steps: int | None, verify: str = "auto",
                  runtime: str = "module", gguf=None) -> list[DLLMDecoder]:
    """The dLLM's own decoding, then SimSD when a drafter is given (both over one converted target, on
    `runtime`). On the lean runtime the module's own decoding follows, named `...-module`, measured against
    the lean runtime's (not lossless against it: other kernels round otherwise)."""
    own, simsd = dllm_runners(target, spec, drafter, drafter_layers, block_size, steps, verify, runtime=runtime,
                              gguf=gguf)
    decoders = [DLLMDecoder(r) for r in (own, simsd) if r is not None]
    if runtime != "module":  # the same converted net, not loaded again
        baseline = DLLMDecoder(DLLMRunner(own.net, None, steps=own.steps, eos_ids=own.eos_ids, label=own.label))
        baseline.name, baseline.reference, baseline.kind = f"{own.name}-module", own.name, "dllm-module"
        decoders.append(baseline)
    return decoders


def parse_drafter_spec(entry: str, default_draft_len: int) -> tuple[str, str, int]:
    """`SPEC` or `SPEC@G` -> (decoder name, drafter spec for build_drafter, draft length).

    The @G suffix (digits only) sets this drafter's draft length; without it the common
    --draft-len applies. An existing path is never split. "none" is named "plain".
    """
    spec, draft_len = entry, default_draft_len
    head, sep, tail = entry.rpartition("@")
    if sep and head and tail.isdigit() and not Path(entry).exists():
        spec, draft_len = head, int(tail)
    if not spec:
        raise DiffdraftError(f"empty drafter spec in {entry!r}")
    if spec == "none":
        return PLAIN, spec, 0
    base = decoder_label(spec)
    name = base if draft_len == default_draft_len else f"{base}@{draft_len}"
    return name, spec, draft_len


# Folder names the trainers give their result inside a run folder: the run folder names it.
RUN_RESULT_NAMES = ("drafter", "adapter")


def decoder_label(spec: str) -> str:
    """A drafter spec's short name: a folder by its own name (a trainer's `drafter`/`adapter`
    by its run folder's), with any `:key=value` options kept; a name stays as it is."""
    folder, options = parse_options(spec)
    if not Path(folder).is_dir():
        return spec
    path = Path(folder.rstrip("/"))
    label = path.parent.name if path.name in RUN_RESULT_NAMES and path.parent.name else path.name
    return format_options(label, options)


# Engine settings a bench drafter entry may carry after its spec: SPEC:cut=0.5:length=fixed:propose=sample
ENGINE_OPTIONS = {"cut": "min_confidence", "length": "length", "propose": "proposals", "tree": "tree",
                  "verify": "verify", "lookup": "lookup"}


def split_engine_options(spec: str) -> tuple[str, dict]:
    """`SPEC:cut=C:length=L:propose=P:tree=N:verify=V:lookup=0|1` -> (SPEC, DraftConfig keyword arguments).

    These are engine settings, not the drafter's, so they are taken off before build_drafter
    sees the spec; other `:key=value` options stay. An existing path is never split. cut is the
    min_confidence (0 = no cut), length auto|fixed, propose argmax|sample, tree the most nodes of
    a draft tree (0 = a chain), verify auto|rejection|point-mass (this entry's, over --verify), lookup
    whether a tree takes the n-gram lookup's branch (default 0).
    """
    base, options = parse_options(spec)
    settings = {}
    for key, field in ENGINE_OPTIONS.items():
        if key in options:
            settings[field] = options.pop(key)
    if "min_confidence" in settings:
        value = settings["min_confidence"]
        try:
            settings["min_confidence"] = float(value)
        except ValueError:
            raise DiffdraftError(f"bad cut {value!r} in {spec!r}: write cut=0.3 (a confidence in [0, 1))") from None
    if "tree" in settings:
        if not settings["tree"].isdigit():
            raise DiffdraftError(f"bad tree {settings['tree']!r} in {spec!r}: write tree=8 (the most nodes)")
        settings["tree"] = int(settings["tree"])
    if "lookup" in settings:
        if settings["lookup"] not in ("0", "1"):
            raise DiffdraftError(f"bad lookup {settings['lookup']!r} in {spec!r}: write lookup=0 or lookup=1")
        settings["lookup"] = settings["lookup"] == "1"
    return (format_options(base, options) if settings else spec), settings


def engine_decoders(
    entries: list[str], target: TargetBackend, draft_len: int, verify: str = "auto", early_exit_layers: int = 4,
    suffix: str = "",
) -> list[EngineDecoder]:
    """Plain decoding first (always: it is the reference), then one decoder per drafter entry. With a
    suffix (a second weight choice, ":float32"), every name carries it and plain + suffix is their reference."""
    decoders: dict[str, EngineDecoder] = {}
    for entry in ["none", *entries]:
        name, spec, g = parse_drafter_spec(entry, draft_len)
        name += suffix
        if name in decoders:
            if spec == "none":
                continue  # "none" named again: plain is already there
            raise DiffdraftError(f"drafter {entry!r} is listed twice")
        spec, settings = split_engine_options(spec)
        draft = DraftConfig(draft_len=g, **{"verify": verify, **settings})  # validates g and the settings
        drafter = build_drafter(spec, target, early_exit_layers=early_exit_layers)
        decoders[name] = EngineDecoder(name, target, drafter, draft, spec=spec)
        decoders[name].reference = PLAIN + suffix
    return list(decoders.values())
