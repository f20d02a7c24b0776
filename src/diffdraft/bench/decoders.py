"""Decoders as the benchmark sees them: token ids in, tokens and Stats out.

A decoder answers one chat-templated prompt (token ids) with up to max_new_tokens tokens
under a SamplingConfig and a seed, and reports what it did as a diffdraft.stats.Stats
(tokens, timings, and the verify-step trace when it has one). The engine's decoders live
here, and so do the dLLM's (kind "dllm": the converted target's own blockwise decoding,
and SimSD with a dLLM drafter, whose reference is that own decoding rather than plain);
peers (HF transformers, llama.cpp) live in peers.py behind the same interface. Every
decoder names its reference: the decoder its speedup and its temperature-0 equality are
measured against. Knows nothing of prompt suites, records or reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from diffdraft.config import DraftConfig, SamplingConfig
from diffdraft.dllm.loading import dllm_runners
from diffdraft.dllm.runner import DLLMRunner, to_stats
from diffdraft.drafters import build_drafter, format_options, parse_options
from diffdraft.engine import SpeculativeEngine, length_policy
from diffdraft.errors import DiffdraftError
from diffdraft.stats import Stats
from diffdraft.target import TargetBackend

PLAIN = "plain"  # the name of the engine's plain decoding, the reference of every speedup and equality


@dataclass
class DecodeRun:
    tokens: list[int]  # new tokens, EOS included when it ended the answer
    stop_reason: str  # "eos", "length" or "context"
    stats: Stats


class Decoder:
    """One way of decoding: a name, a kind ("engine" or "peer") and run()."""

    name: str = "decoder"
    kind: str = "engine"
    draft_len: int = 0
    reference: str = PLAIN  # the decoder this one's speedup and equality are measured against

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int) -> DecodeRun:
        raise NotImplementedError

    def describe(self) -> dict:
        """What goes into the results file about this decoder."""
        return {"name": self.name, "kind": self.kind, "draft_len": self.draft_len, "reference": self.reference}


class EngineDecoder(Decoder):
    """diffdraft's SpeculativeEngine with one drafter (or none: plain decoding)."""

    kind = "engine"

    def __init__(self, name: str, spec: str, target: TargetBackend, draft: DraftConfig, early_exit_layers: int = 4):
        self.name = name
        self.spec = spec
        self.target = target
        self.drafter = build_drafter(spec, target, early_exit_layers=early_exit_layers)
        self.draft = draft
        self.draft_len = draft.draft_len if self.drafter is not None else 0
        # One length rule for the whole run, built (costs measured) before any timed generation; its
        # calibration carries over from prompt to prompt, as it would in a server.
        self.policy = length_policy(target, self.drafter, draft)

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int) -> DecodeRun:
        engine = SpeculativeEngine(self.target, self.drafter, draft=self.draft, sampling=sampling, policy=self.policy)
        result = engine.generate(prompt, max_new_tokens=max_new_tokens, seed=seed)
        return DecodeRun(tokens=result.tokens, stop_reason=result.stop_reason, stats=result.stats)

    def describe(self) -> dict:
        return {**super().describe(), "spec": self.spec, "verify": self.draft.verify,
                "min_confidence": self.draft.min_confidence, "length": self.draft.length,
                "proposals": self.draft.proposals}


class DLLMDecoder(Decoder):
    """The dLLM target's own decoding (no drafter; its own reference) or SimSD (reference: the former)."""

    kind = "dllm"

    def __init__(self, runner: DLLMRunner):
        self.runner = runner
        self.name = runner.name
        self.draft_len = runner.draft_len
        self.reference = runner.baseline_name

    def run(self, prompt: list[int], max_new_tokens: int, sampling: SamplingConfig, seed: int) -> DecodeRun:
        result = self.runner.run(prompt, max_new_tokens, sampling, seed)
        return DecodeRun(tokens=result.tokens, stop_reason=self.runner.stop_reason(result),
                         stats=to_stats(result, self.draft_len))

    def describe(self) -> dict:
        net = self.runner.net
        drafter = self.runner.drafter
        return {**super().describe(), "block_size": net.block_size, "steps": self.runner.steps,
                "verify": self.runner.verify if drafter else None,
                "drafter_layers": drafter.net.num_layers if drafter else None}


def dllm_decoders(target: TargetBackend, spec: str, drafter: str | None, drafter_layers: int | None,
                  block_size: int | None, steps: int | None, verify: str = "auto") -> list[DLLMDecoder]:
    """The dLLM's own decoding, then SimSD when a drafter is given (both over one converted target)."""
    own, simsd = dllm_runners(target, spec, drafter, drafter_layers, block_size, steps, verify)
    return [DLLMDecoder(r) for r in (own, simsd) if r is not None]


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
ENGINE_OPTIONS = {"cut": "min_confidence", "length": "length", "propose": "proposals"}


def split_engine_options(spec: str) -> tuple[str, dict]:
    """`SPEC:cut=C:length=L:propose=P` -> (SPEC, DraftConfig keyword arguments).

    These are engine settings, not the drafter's, so they are taken off before build_drafter
    sees the spec; other `:key=value` options stay. An existing path is never split. cut is the
    min_confidence (0 = no cut), length auto|fixed, propose argmax|sample.
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
    return (format_options(base, options) if settings else spec), settings


def engine_decoders(
    entries: list[str], target: TargetBackend, draft_len: int, verify: str = "auto", early_exit_layers: int = 4
) -> list[EngineDecoder]:
    """Plain decoding first (always: it is the reference), then one decoder per drafter entry."""
    decoders: dict[str, EngineDecoder] = {}
    for entry in ["none", *entries]:
        name, spec, g = parse_drafter_spec(entry, draft_len)
        if name in decoders:
            if spec == "none":
                continue  # "none" named again: plain is already there
            raise DiffdraftError(f"drafter {entry!r} is listed twice")
        spec, settings = split_engine_options(spec)
        draft = DraftConfig(draft_len=g, verify=verify, **settings)  # validates g and the settings
        decoders[name] = EngineDecoder(name, spec, target, draft, early_exit_layers=early_exit_layers)
    return list(decoders.values())
